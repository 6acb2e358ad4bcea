//! The load scenarios: `cold`, `warm`, `fanout` (Workload API or SDS streams) and `churn`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use serde::Serialize;
use spiffed_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spiffed_proto::workload::{JwtsvidRequest, X509svidRequest};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::client::{Client, channel, code_name, connect, with_header};
use crate::procstat::{self, ProcSample};
use crate::stats::{ErrorCounts, MAX_SAMPLES, Percentiles, Reservoir, merge_errors};

/// How long one iteration may take before it counts as `Timeout`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The audience `warm --rpc jwt` asks for.
pub const JWT_AUDIENCE: &str = "spiffed-loadgen";

/// Which RPC the `warm` scenario repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WarmRpc {
    /// `FetchJWTSVID` (unary).
    Jwt,
    /// `FetchX509SVID`, up to its first message, then the stream is dropped.
    X509,
}

impl WarmRpc {
    /// `jwt` or `x509`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::X509 => "x509",
        }
    }
}

/// The result of a `cold` or `warm` run: one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `cold` or `warm`.
    pub scenario: &'static str,
    /// The RPC measured (`x509` or `jwt`).
    pub rpc: WarmRpc,
    /// The socket driven.
    pub socket: PathBuf,
    /// Concurrent workers.
    pub concurrency: usize,
    /// Requested duration.
    pub seconds: f64,
    /// Measured duration (until the last worker finished).
    pub elapsed_s: f64,
    /// Successful iterations.
    pub ok: u64,
    /// Successful iterations per second of `elapsed_s`.
    pub rate_per_s: f64,
    /// Latency of successful iterations.
    #[serde(flatten)]
    pub latency: Percentiles,
    /// Failed iterations by cause.
    pub errors: ErrorCounts,
    /// The floor's rate in the same run, when compared (`--compare-floor`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_rate_per_s: Option<f64>,
    /// `rate_per_s / floor_rate_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction_of_floor: Option<f64>,
    /// The floor's p50 latency in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_p50_us: Option<u32>,
}

impl RunReport {
    /// Adds the floor's figures from `floor`, a run of the same scenario against the floor.
    pub fn compare_with(&mut self, floor: &RunReport) {
        self.floor_rate_per_s = Some(floor.rate_per_s);
        self.floor_p50_us = Some(floor.latency.p50_us);
        if floor.rate_per_s > 0.0 {
            self.fraction_of_floor = Some(round3(self.rate_per_s / floor.rate_per_s));
        }
    }

    /// A readable one-paragraph summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} {} c={} {:.1}s: ok={} rate={:.1}/s p50={}us p90={}us p99={}us max={}us errors={:?}",
            self.scenario,
            self.rpc.as_str(),
            self.concurrency,
            self.elapsed_s,
            self.ok,
            self.rate_per_s,
            self.latency.p50_us,
            self.latency.p90_us,
            self.latency.p99_us,
            self.latency.max_us,
            self.errors,
        );
        if let (Some(fr), Some(frac)) = (self.floor_rate_per_s, self.fraction_of_floor) {
            s.push_str(&format!(
                "\n  floor: rate={fr:.1}/s p50={}us; spiffed reaches {:.1}% of the floor",
                self.floor_p50_us.unwrap_or(0),
                frac * 100.0
            ));
        }
        s
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs `f` under [`REQUEST_TIMEOUT`], mapping a timeout to `Timeout`.
async fn timed<F>(f: F) -> Result<(), String>
where
    F: Future<Output = Result<(), String>>,
{
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err("Timeout".to_owned()))
}

/// Opens `FetchX509SVID` on `client` and waits for the first message.
async fn x509_first(client: &mut Client) -> Result<(), String> {
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .map_err(|s| code_name(&s))?
        .into_inner();
    match stream.message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("NoMessage".to_owned()),
        Err(s) => Err(code_name(&s)),
    }
}

/// One `FetchJWTSVID` call on `client`.
async fn jwt_once(client: &mut Client) -> Result<(), String> {
    let resp = client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec![JWT_AUDIENCE.to_owned()],
            spiffe_id: String::new(),
        }))
        .await
        .map_err(|s| code_name(&s))?;
    if resp.get_ref().svids.is_empty() {
        return Err("NoSvid".to_owned());
    }
    Ok(())
}

/// One cold iteration: connect, `FetchX509SVID` to the first message, close.
pub async fn cold_once(socket: &Path) -> Result<(), String> {
    timed(async {
        let mut client = connect(socket).await.map_err(|_| "Connect".to_owned())?;
        x509_first(&mut client).await
    })
    .await
}

/// What one worker hands back.
struct WorkerResult {
    samples: Reservoir,
    errors: ErrorCounts,
}

/// The scenario a worker runs.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Cold,
    Warm(WarmRpc),
}

async fn worker(
    socket: PathBuf,
    mode: Mode,
    deadline: Instant,
    cap: usize,
    seed: u64,
) -> WorkerResult {
    let mut samples = Reservoir::new(cap, seed);
    let mut errors = ErrorCounts::new();
    let mut client: Option<Client> = None;
    while Instant::now() < deadline {
        let start = Instant::now();
        let result = match mode {
            Mode::Cold => cold_once(&socket).await,
            Mode::Warm(rpc) => {
                let c = match client.as_mut() {
                    Some(c) => c,
                    None => match connect(&socket).await {
                        Ok(c) => client.insert(c),
                        Err(_) => {
                            *errors.entry("Connect".to_owned()).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                timed(async {
                    match rpc {
                        WarmRpc::Jwt => jwt_once(c).await,
                        WarmRpc::X509 => x509_first(c).await,
                    }
                })
                .await
            }
        };
        match result {
            Ok(()) => samples.record(start.elapsed()),
            Err(code) => {
                if code == "Unavailable" || code == "Timeout" {
                    // The connection may be gone: open a fresh one next time.
                    client = None;
                }
                *errors.entry(code).or_default() += 1;
            }
        }
    }
    WorkerResult { samples, errors }
}

async fn run(
    socket: &Path,
    mode: Mode,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<RunReport> {
    let concurrency = concurrency.max(1);
    let start = Instant::now();
    let deadline = start + duration;
    let cap = MAX_SAMPLES / concurrency;
    let mut set = JoinSet::new();
    for w in 0..concurrency {
        set.spawn(worker(
            socket.to_owned(),
            mode,
            deadline,
            cap,
            0x9e37_79b9_7f4a_7c15 ^ w as u64,
        ));
    }
    let mut all = Vec::new();
    let mut errors = ErrorCounts::new();
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        let r = r?;
        ok += r.samples.seen();
        merge_errors(&mut errors, r.errors);
        all.extend(r.samples.into_samples());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (scenario, rpc) = match mode {
        Mode::Cold => ("cold", WarmRpc::X509),
        Mode::Warm(rpc) => ("warm", rpc),
    };
    Ok(RunReport {
        scenario,
        rpc,
        socket: socket.to_owned(),
        concurrency,
        seconds: duration.as_secs_f64(),
        elapsed_s: round3(elapsed),
        ok,
        rate_per_s: round1(ok as f64 / elapsed.max(1e-9)),
        latency: Percentiles::from_samples(all),
        errors,
        floor_rate_per_s: None,
        fraction_of_floor: None,
        floor_p50_us: None,
    })
}

/// `cold`: `concurrency` workers, each repeatedly connecting, reading the first `FetchX509SVID`
/// message and closing, for `duration`.
pub async fn cold(
    socket: &Path,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<RunReport> {
    run(socket, Mode::Cold, concurrency, duration).await
}

/// `warm`: `concurrency` workers with one connection each, repeating `rpc` for `duration`.
pub async fn warm(
    socket: &Path,
    concurrency: usize,
    duration: Duration,
    rpc: WarmRpc,
) -> anyhow::Result<RunReport> {
    run(socket, Mode::Warm(rpc), concurrency, duration).await
}

/// Which streams a fan-out opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FanoutApi {
    /// Workload API `FetchX509SVID` streams (scenario `fanout`).
    X509,
    /// Envoy SDS v3 `StreamSecrets` streams asking for these resource names, each first
    /// response acknowledged as Envoy does (scenario `sds_fanout`).
    Sds {
        /// The resource names every stream asks for (`default`, `ROOTCA`, ...).
        names: Vec<String>,
    },
}

impl FanoutApi {
    /// The scenario name in the report.
    pub fn scenario(&self) -> &'static str {
        match self {
            Self::X509 => "fanout",
            Self::Sds { .. } => "sds_fanout",
        }
    }
}

/// The type URL of SDS secrets, as Envoy asks for them.
pub const SDS_SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The result of a `fanout` or `sds-fanout` run.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// `fanout` (Workload API streams) or `sds_fanout` (SDS streams).
    pub scenario: &'static str,
    /// The SDS resource names asked for (`sds_fanout` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sds_names: Option<Vec<String>>,
    /// Streams opened.
    pub streams: usize,
    /// Connections they were spread over.
    pub connections: usize,
    /// Client threads the connections were split over (each its own runtime).
    pub client_threads: usize,
    /// Streams that got their first message.
    pub ready: usize,
    /// Streams that got their second message (the rotation).
    pub updated: usize,
    /// From the start until the last stream had its first message.
    pub all_ready_ms: f64,
    /// From the first stream's update to the last stream's update.
    pub first_to_last_update_ms: Option<f64>,
    /// From all streams ready to the last stream's update (negative if some updated earlier).
    pub all_ready_to_last_update_ms: Option<f64>,
    /// Whether the timeout ended the run before every stream updated.
    pub timed_out: bool,
    /// Failures by cause.
    pub errors: ErrorCounts,
    /// The agent before any stream was opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_before: Option<ProcSample>,
    /// The agent with every stream open and ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_ready: Option<ProcSample>,
    /// The agent after the last update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_after: Option<ProcSample>,
    /// The agent's CPU time while the streams were opened (before to all ready, ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_cpu_open_ms: Option<f64>,
    /// The agent's CPU time from all streams ready to the last update (ms): the rotation's cost,
    /// plus whatever the agent did while waiting for it to fall due.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_cpu_rotation_ms: Option<f64>,
    /// `agent_cpu_rotation_ms` per updated stream (µs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_cpu_per_stream_us: Option<f64>,
    /// The loadgen's own CPU time over the same span per updated stream (µs): what the
    /// clients cost, on the same cores as the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loadgen_cpu_per_stream_us: Option<f64>,
}

/// CPU time (ms) between two samples of the same process.
fn cpu_between(a: Option<ProcSample>, b: Option<ProcSample>) -> Option<f64> {
    procstat::cpu_delta_ms(&a?, &b?).map(round3)
}

impl FanoutReport {
    /// A readable summary.
    pub fn summary(&self) -> String {
        format!(
            "{} n={} k={}: ready={} in {:.1}ms, updated={}, first->last update {}ms, all-ready->last update {}ms, timed_out={} errors={:?}\n  agent before: {} | all ready: {} | after: {} | cpu per updated stream {}us (loadgen {}us, {} client threads)",
            self.scenario,
            self.streams,
            self.connections,
            self.ready,
            self.all_ready_ms,
            self.updated,
            opt_ms(self.first_to_last_update_ms),
            opt_ms(self.all_ready_to_last_update_ms),
            self.timed_out,
            self.errors,
            opt_sample(self.agent_before),
            opt_sample(self.agent_ready),
            opt_sample(self.agent_after),
            self.agent_cpu_per_stream_us
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
            self.loadgen_cpu_per_stream_us
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
            self.client_threads,
        )
    }
}

fn opt_sample(v: Option<ProcSample>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// What a fanout stream reports.
enum StreamEvent {
    Ready,
    Updated(Instant),
    Failed(String),
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    let ms = if b >= a {
        b.duration_since(a).as_secs_f64()
    } else {
        -a.duration_since(b).as_secs_f64()
    } * 1000.0;
    round3(ms)
}

/// `fanout`: `streams` `FetchX509SVID` streams over `connections` connections; once every
/// stream has its first message, waits (up to `timeout`) for each stream's next message, which
/// the agent sends on rotation (run it with a short TTL).
pub async fn fanout(
    socket: &Path,
    streams: usize,
    connections: usize,
    agent_pid: Option<u32>,
    timeout: Duration,
) -> anyhow::Result<FanoutReport> {
    fanout_api(
        socket,
        FanoutApi::X509,
        streams,
        connections,
        agent_pid,
        timeout,
        0,
    )
    .await
}

/// `sds-fanout`: [`fanout`] with SDS `StreamSecrets` streams asking for `names`, each response
/// acknowledged as Envoy does; the second response of each stream is the rotation.
pub async fn sds_fanout(
    socket: &Path,
    names: Vec<String>,
    streams: usize,
    connections: usize,
    agent_pid: Option<u32>,
    timeout: Duration,
) -> anyhow::Result<FanoutReport> {
    fanout_api(
        socket,
        FanoutApi::Sds { names },
        streams,
        connections,
        agent_pid,
        timeout,
        0,
    )
    .await
}

/// [`fanout`] or [`sds_fanout`], by `api`: the same phases and figures for either kind of
/// stream, so that the two are comparable.
///
/// The connections are split over `client_threads` OS threads (0: one per CPU; never more
/// than `connections`), each with its own
/// single-threaded runtime that owns its connections and their streams, as separate client
/// processes would (one Envoy per workload). On one shared work-stealing runtime a stream's
/// task, its request body's task and its connection's task wake one another across threads
/// for every message, and that cost, not the agent's, set the SDS fan-out's spread.
pub async fn fanout_api(
    socket: &Path,
    api: FanoutApi,
    streams: usize,
    connections: usize,
    agent_pid: Option<u32>,
    timeout: Duration,
    client_threads: usize,
) -> anyhow::Result<FanoutReport> {
    let agent_before = agent_pid.map(procstat::sample);
    let start = Instant::now();
    let connections = connections.max(1);
    let threads = match client_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(connections);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let conns = share(connections, threads, t);
        let n = share(streams, threads, t);
        let (tx, api, socket, stop) = (tx.clone(), api.clone(), socket.to_owned(), stop_rx.clone());
        let handle = std::thread::Builder::new()
            .name(format!("fanout-client-{t}"))
            .spawn(move || fanout_client(&socket, api, n, conns, tx, stop))
            .map_err(|e| anyhow::anyhow!("cannot start a client thread: {e}"))?;
        handles.push(handle);
    }
    drop(tx);

    // Each thread says once that its streams are all ready (or failed), and once that they
    // have all updated: two messages per thread, not one per stream, so that the collector's
    // wake-ups do not compete with the agent during the rotation.
    let (mut threads_ready, mut threads_updated) = (0, 0);
    let mut all_ready_at = None;
    let mut agent_ready = None;
    let mut own_ready = None;
    let mut timed_out = false;
    let mut deadline = tokio::time::Instant::now() + timeout;
    while threads_ready < threads || threads_updated < threads {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ClientPhase::Ready)) => threads_ready += 1,
            Ok(Some(ClientPhase::Updated)) => threads_updated += 1,
            Ok(None) => break,
            Err(_) => {
                timed_out = true;
                break;
            }
        }
        if all_ready_at.is_none() && threads_ready >= threads {
            all_ready_at = Some(Instant::now());
            agent_ready = agent_pid.map(procstat::sample);
            own_ready = Some(procstat::sample(std::process::id()));
            // The update phase gets its own timeout.
            deadline = tokio::time::Instant::now() + timeout;
        }
    }
    let agent_after = agent_pid.map(procstat::sample);
    let own_after = procstat::sample(std::process::id());
    let _ = stop_tx.send(true);
    let reports = tokio::task::spawn_blocking(move || {
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    // Its streams count as not updated; say why.
                    let mut r = ClientReport::default();
                    r.errors.insert("ClientThreadPanicked".to_owned(), 1);
                    r
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| anyhow::anyhow!("the client threads could not be joined: {e}"))?;
    let mut errors = ErrorCounts::new();
    let (mut connected, mut ready) = (0, 0);
    let mut updates: Vec<Instant> = Vec::with_capacity(streams);
    for r in reports {
        connected += r.connected;
        ready += r.ready;
        updates.extend(r.updates);
        merge_errors(&mut errors, r.errors);
    }
    if connected == 0 {
        anyhow::bail!("could not connect to {}", socket.display());
    }
    let first = updates.iter().min().copied();
    let last = updates.iter().max().copied();
    let per_stream = |ms: f64| round3(ms * 1000.0 / updates.len() as f64);
    let agent_cpu_rotation_ms = cpu_between(agent_ready, agent_after);
    let agent_cpu_per_stream_us = agent_cpu_rotation_ms
        .filter(|_| !updates.is_empty())
        .map(per_stream);
    let loadgen_cpu_per_stream_us = cpu_between(own_ready, Some(own_after))
        .filter(|_| !updates.is_empty())
        .map(per_stream);
    Ok(FanoutReport {
        scenario: api.scenario(),
        sds_names: match api {
            FanoutApi::X509 => None,
            FanoutApi::Sds { names } => Some(names),
        },
        streams,
        connections: connected,
        client_threads: threads,
        ready,
        updated: updates.len(),
        all_ready_ms: all_ready_at.map_or(-1.0, |t| ms_between(start, t)),
        first_to_last_update_ms: first.zip(last).map(|(a, b)| ms_between(a, b)),
        all_ready_to_last_update_ms: all_ready_at.zip(last).map(|(a, b)| ms_between(a, b)),
        timed_out,
        errors,
        agent_before,
        agent_ready,
        agent_after,
        agent_cpu_open_ms: cpu_between(agent_before, agent_ready),
        agent_cpu_rotation_ms,
        agent_cpu_per_stream_us,
        loadgen_cpu_per_stream_us,
    })
}

/// Part `i` of `total` split into `parts` near-equal parts.
fn share(total: usize, parts: usize, i: usize) -> usize {
    total / parts + usize::from(i < total % parts)
}

/// What a client thread tells the collector, once each.
enum ClientPhase {
    /// Every stream of the thread has its first message, or failed.
    Ready,
    /// Every stream of the thread has its second message (the rotation), or failed.
    Updated,
}

/// What a client thread saw, returned when it stops.
#[derive(Default)]
struct ClientReport {
    connected: usize,
    ready: usize,
    updates: Vec<Instant>,
    errors: ErrorCounts,
}

/// One client thread of a fan-out: its own runtime, `connections` connections and `streams`
/// streams over them, kept open until `stop` turns true.
fn fanout_client(
    socket: &Path,
    api: FanoutApi,
    streams: usize,
    connections: usize,
    phases: mpsc::UnboundedSender<ClientPhase>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> ClientReport {
    let mut report = ClientReport::default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            *report.errors.entry(format!("Runtime: {e}")).or_default() += streams as u64;
            let _ = phases.send(ClientPhase::Ready);
            let _ = phases.send(ClientPhase::Updated);
            return report;
        }
    };
    rt.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..connections {
            match channel(socket).await {
                Ok(c) => channels.push(c),
                Err(_) => *report.errors.entry("Connect".to_owned()).or_default() += 1,
            }
        }
        report.connected = channels.len();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut set = JoinSet::new();
        let mut failed = 0;
        for i in 0..streams {
            let Some(channel) = channels.get(i % channels.len().max(1)).cloned() else {
                // This thread could not connect at all.
                failed += 1;
                *report.errors.entry("NoConnection".to_owned()).or_default() += 1;
                continue;
            };
            let tx = tx.clone();
            match &api {
                FanoutApi::X509 => set.spawn(x509_fanout_stream(channel, tx)),
                FanoutApi::Sds { names } => {
                    set.spawn(sds_fanout_stream(channel, names.clone(), tx))
                }
            };
        }
        drop(tx);
        let (mut said_ready, mut said_updated) = (false, false);
        let stopped = stop.wait_for(|s| *s);
        tokio::pin!(stopped);
        loop {
            if !said_ready && report.ready + failed >= streams {
                said_ready = true;
                let _ = phases.send(ClientPhase::Ready);
            }
            if !said_updated && report.updates.len() + failed >= streams {
                said_updated = true;
                let _ = phases.send(ClientPhase::Updated);
            }
            let ev = tokio::select! {
                biased;
                _ = &mut stopped => break,
                ev = rx.recv() => ev,
            };
            match ev {
                Some(StreamEvent::Ready) => report.ready += 1,
                Some(StreamEvent::Updated(at)) => report.updates.push(at),
                Some(StreamEvent::Failed(code)) => {
                    failed += 1;
                    *report.errors.entry(code).or_default() += 1;
                }
                // Every stream has ended; wait for the collector to stop this thread.
                None => {
                    let _ = stopped.await;
                    break;
                }
            }
        }
        set.abort_all();
    });
    report
}

/// One `FetchX509SVID` stream of a fan-out: reports its first message (ready) and its second
/// (the rotation), then stays open until the run ends.
async fn x509_fanout_stream(channel: Channel, tx: mpsc::UnboundedSender<StreamEvent>) {
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut stream = match client.fetch_x509svid(with_header(X509svidRequest {})).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let _ = tx.send(StreamEvent::Failed(code_name(&s)));
            return;
        }
    };
    for first in [true, false] {
        let ev = match stream.message().await {
            Ok(Some(_)) if first => StreamEvent::Ready,
            Ok(Some(_)) => StreamEvent::Updated(Instant::now()),
            Ok(None) => StreamEvent::Failed("NoMessage".to_owned()),
            Err(s) => StreamEvent::Failed(code_name(&s)),
        };
        let failed = matches!(ev, StreamEvent::Failed(_));
        let _ = tx.send(ev);
        if failed {
            return;
        }
    }
    // Keep the stream open until the run ends (the JoinSet is dropped).
    std::future::pending::<()>().await;
}

/// One SDS `StreamSecrets` stream of a fan-out, driven as Envoy drives it: a request with a node
/// and `names`; its first response (ready) acknowledged with that response's version and nonce;
/// the next response is the rotation (updated), acknowledged too. The request side stays open
/// until the run ends (closing it ends the stream on spire-agent).
async fn sds_fanout_stream(
    channel: Channel,
    names: Vec<String>,
    tx: mpsc::UnboundedSender<StreamEvent>,
) {
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (req_tx, req_rx) = mpsc::channel::<DiscoveryRequest>(4);
    let first = DiscoveryRequest {
        node: Some(Node {
            id: "spiffed-loadgen".to_owned(),
            cluster: "spiffed-loadgen".to_owned(),
            ..Node::default()
        }),
        resource_names: names.clone(),
        type_url: SDS_SECRET_TYPE.to_owned(),
        ..DiscoveryRequest::default()
    };
    // Queued before the call: a server may hold its response headers until it has an answer,
    // which needs this request.
    if req_tx.send(first).await.is_err() {
        let _ = tx.send(StreamEvent::Failed("RequestQueue".to_owned()));
        return;
    }
    let mut stream = match client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let _ = tx.send(StreamEvent::Failed(code_name(&s)));
            return;
        }
    };
    for first in [true, false] {
        let ev = match stream.message().await {
            Ok(Some(resp)) if resp.resources.is_empty() => {
                StreamEvent::Failed("NoResources".to_owned())
            }
            Ok(Some(resp)) => {
                let ack = DiscoveryRequest {
                    version_info: resp.version_info,
                    response_nonce: resp.nonce,
                    resource_names: names.clone(),
                    type_url: SDS_SECRET_TYPE.to_owned(),
                    ..DiscoveryRequest::default()
                };
                if req_tx.send(ack).await.is_err() {
                    StreamEvent::Failed("RequestQueue".to_owned())
                } else if first {
                    StreamEvent::Ready
                } else {
                    StreamEvent::Updated(Instant::now())
                }
            }
            Ok(None) => StreamEvent::Failed("NoMessage".to_owned()),
            Err(s) => StreamEvent::Failed(code_name(&s)),
        };
        let failed = matches!(ev, StreamEvent::Failed(_));
        let _ = tx.send(ev);
        if failed {
            return;
        }
    }
    // Keep both directions open until the run ends (the JoinSet is dropped).
    let _keep = req_tx;
    std::future::pending::<()>().await;
}

/// One periodic `churn` sample: a JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnSample {
    /// Always `churn_sample`.
    pub scenario: &'static str,
    /// Seconds since the start.
    pub t_s: f64,
    /// Successful iterations so far.
    pub ok: u64,
    /// Failed iterations so far, by cause.
    pub errors: ErrorCounts,
    /// Iterations in progress.
    pub in_flight: usize,
    /// The agent's RSS and descriptors now.
    #[serde(flatten)]
    pub agent: ProcSample,
}

/// The result of a `churn` run.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    /// Always `churn`.
    pub scenario: &'static str,
    /// The requested rate.
    pub target_rate_per_s: f64,
    /// The requested duration.
    pub seconds: f64,
    /// Successful iterations.
    pub ok: u64,
    /// Successful iterations per second.
    pub rate_per_s: f64,
    /// Latency of successful iterations.
    #[serde(flatten)]
    pub latency: Percentiles,
    /// Failures by cause (`Skipped`: too many iterations already in flight).
    pub errors: ErrorCounts,
    /// The agent at the start.
    pub agent_start: ProcSample,
    /// The agent at the end, after in-flight iterations finished.
    pub agent_end: ProcSample,
    /// Largest RSS seen (KiB).
    pub agent_max_rss_kib: Option<u64>,
    /// Largest descriptor count seen.
    pub agent_max_fds: Option<u64>,
}

impl ChurnReport {
    /// A readable summary.
    pub fn summary(&self) -> String {
        format!(
            "churn {:.0}/s for {:.0}s: ok={} rate={:.1}/s p50={}us p99={}us max={}us errors={:?}\n  agent start: {} | end: {} | max rss_kib={} fds={}",
            self.target_rate_per_s,
            self.seconds,
            self.ok,
            self.rate_per_s,
            self.latency.p50_us,
            self.latency.p99_us,
            self.latency.max_us,
            self.errors,
            self.agent_start,
            self.agent_end,
            self.agent_max_rss_kib
                .map_or_else(|| "?".to_owned(), |v| v.to_string()),
            self.agent_max_fds
                .map_or_else(|| "?".to_owned(), |v| v.to_string()),
        )
    }
}

/// Shared tallies of a churn run.
struct Tally {
    samples: Reservoir,
    errors: ErrorCounts,
}

fn tally_error(tally: &Mutex<Tally>, code: String) {
    if let Ok(mut t) = tally.lock() {
        *t.errors.entry(code).or_default() += 1;
    }
}

/// `churn`: cold iterations started at a fixed `rate` per second for `duration`, sampling the
/// agent every `sample_every` and handing each sample to `emit`.
pub async fn churn(
    socket: &Path,
    rate: f64,
    duration: Duration,
    agent_pid: u32,
    sample_every: Duration,
    mut emit: impl FnMut(&ChurnSample),
) -> anyhow::Result<ChurnReport> {
    anyhow::ensure!(rate > 0.0, "rate must be positive");
    let tally = Arc::new(Mutex::new(Tally {
        samples: Reservoir::new(MAX_SAMPLES, 0x2545_f491_4f6c_dd1d),
        errors: ErrorCounts::new(),
    }));
    let max_in_flight = ((rate * 10.0) as usize).max(64);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let agent_start = procstat::sample(agent_pid);
    let (mut max_rss, mut max_fds) = (agent_start.rss_kib, agent_start.fds);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut sample_tick = tokio::time::interval(sample_every.max(Duration::from_millis(10)));
    let mut set = JoinSet::new();
    let snapshot = |tally: &Mutex<Tally>| {
        tally
            .lock()
            .map(|t| (t.samples.seen(), t.errors.clone()))
            .unwrap_or_default()
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick() => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tally_error(&tally, "Skipped".to_owned());
                    continue;
                };
                let socket = socket.to_owned();
                let tally = tally.clone();
                set.spawn(async move {
                    let t0 = Instant::now();
                    let r = cold_once(&socket).await;
                    let took = t0.elapsed();
                    drop(permit);
                    match r {
                        Ok(()) => {
                            if let Ok(mut t) = tally.lock() {
                                t.samples.record(took);
                            }
                        }
                        Err(code) => tally_error(&tally, code),
                    }
                });
            }
            _ = sample_tick.tick() => {
                let agent = procstat::sample(agent_pid);
                max_rss = max_rss.max(agent.rss_kib);
                max_fds = max_fds.max(agent.fds);
                let (ok, errors) = snapshot(&tally);
                emit(&ChurnSample {
                    scenario: "churn_sample",
                    t_s: round3(start.elapsed().as_secs_f64()),
                    ok,
                    errors,
                    in_flight: max_in_flight - permits.available_permits(),
                    agent,
                });
            }
            Some(r) = set.join_next(), if !set.is_empty() => r?,
        }
    }
    while let Some(r) = set.join_next().await {
        r?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let agent_end = procstat::sample(agent_pid);
    max_rss = max_rss.max(agent_end.rss_kib);
    max_fds = max_fds.max(agent_end.fds);
    let tally = Arc::try_unwrap(tally)
        .map_err(|_| anyhow::anyhow!("churn tasks still hold the tally"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("churn tally poisoned"))?;
    let ok = tally.samples.seen();
    Ok(ChurnReport {
        scenario: "churn",
        target_rate_per_s: rate,
        seconds: duration.as_secs_f64(),
        ok,
        rate_per_s: round1(ok as f64 / elapsed.max(1e-9)),
        latency: Percentiles::from_samples(tally.samples.into_samples()),
        errors: tally.errors,
        agent_start,
        agent_end,
        agent_max_rss_kib: max_rss,
        agent_max_fds: max_fds,
    })
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn share_splits_everything_and_evenly() {
        for (total, parts) in [(10_000, 2), (100, 3), (7, 7), (2, 5), (0, 2)] {
            let got: Vec<usize> = (0..parts).map(|i| share(total, parts, i)).collect();
            assert_eq!(
                got.iter().sum::<usize>(),
                total,
                "{total} over {parts}: {got:?}"
            );
            let (min, max) = (got.iter().min().unwrap(), got.iter().max().unwrap());
            assert!(max - min <= 1, "{total} over {parts}: {got:?}");
        }
    }
}
