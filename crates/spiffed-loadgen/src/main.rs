//! The `spiffed-loadgen` command line: see the crate docs of `spiffed_loadgen`.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde::Serialize;
use spiffed_loadgen::floor;
use spiffed_loadgen::scenarios::{self, RunReport, WarmRpc};
use spiffed_loadgen::stats::ErrorCounts;

/// Load generator for SPIFFE Workload API sockets.
#[derive(Debug, Parser)]
#[command(name = "spiffed-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
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
        /// The Workload API socket.
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
        Cmd::Fanout {
            socket,
            streams,
            connections,
            agent_pid,
            timeout,
            allow_errors,
        } => {
            let report =
                scenarios::fanout(&socket, streams, connections, agent_pid, timeout).await?;
            json_line(&report)?;
            say(&report.summary());
            anyhow::ensure!(
                allow_errors || (!report.timed_out && report.errors.is_empty()),
                "not every stream saw a rotation (timed out: {}, errors: {:?})",
                report.timed_out,
                report.errors
            );
            Ok(())
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
        Cmd::Floor { socket } => {
            let listener =
                floor::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
            say(&format!("floor serving on {}", socket.display()));
            tokio::select! {
                r = floor::serve(listener) => r,
                r = tokio::signal::ctrl_c() => {
                    let _ = std::fs::remove_file(&socket);
                    Ok(r?)
                }
            }
        }
    }
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
