//! Scenarios for the scale benchmark (`bench/scale.sh`): an agent with many registration entries
//! and callers of many uids.
//!
//! - `first-fetch` ([`first_fetch`]): for each of K uids, a child process running as that uid
//!   (this binary's hidden `fetch-once`, [`fetch_once`]) connects and reads the first
//!   `FetchX509SVID` message. It reports the latency from connect to that message and how old the
//!   SVID was, which tells an SVID minted for the call from one minted before it.
//! - `partial-rotation` ([`partial_rotation`]): two groups of streams, each held by a child of
//!   its own uid (the hidden `hold`, [`hold`]): a small group whose entry rotates and a large
//!   group whose entry does not. The agent's CPU time per rotation seen by the small group,
//!   measured with and without the large group, says whether a rotation costs work for streams
//!   it does not concern.
//! - `admin-create` ([`admin_create`]): single-entry `CreateEntries` calls on the admin socket,
//!   timed with and without the connection set-up.
//!
//! Children get a uid with [`tokio::process::Command::uid`]; a uid other than the loadgen's own
//! needs root.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use spiffed_proto::admin::entry_admin_client::EntryAdminClient;
use spiffed_proto::admin::{CreateEntriesRequest, EntrySpec};
use spiffed_proto::workload::X509svidRequest;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::client::{channel, code_name, connect, with_header};
use crate::procstat::{self, ProcSample};
use crate::stats::{ErrorCounts, Percentiles};

/// How long one fetch may take before it counts as `Timeout`.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How far past the backdated `notBefore` an SVID may be and still count as minted for the call
/// that received it: certificate times have whole seconds, plus the call's own latency.
pub const FRESH_WITHIN: Duration = Duration::from_secs(2);

/// An inclusive range of uids: `FIRST-LAST` (or one uid) on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UidRange {
    /// The first uid.
    pub first: u32,
    /// The last uid (inclusive).
    pub last: u32,
}

impl FromStr for UidRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim().parse::<u32>().map_err(|e| {
                format!("{t:?} is not a uid ({e}); write FIRST-LAST, e.g. 200000-299999")
            })
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let u = num(s)?;
                (u, u)
            }
        };
        if first > last {
            return Err(format!(
                "the range {s:?} is empty: the first uid must not exceed the last"
            ));
        }
        Ok(Self { first, last })
    }
}

impl UidRange {
    /// How many uids the range holds.
    pub fn len(&self) -> u64 {
        u64::from(self.last) - u64::from(self.first) + 1
    }

    /// Always false: a range holds at least one uid.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `k` distinct uids spread evenly over the range, in ascending order.
    pub fn spread(&self, k: usize) -> Result<Vec<u32>, String> {
        let len = self.len();
        let want = k as u64;
        if want == 0 || want > len {
            return Err(format!(
                "cannot pick {k} distinct uids from {}-{} ({len} uids): ask for 1 to {len}",
                self.first, self.last
            ));
        }
        Ok((0..want)
            .map(|i| {
                // i * len / want < len, so the sum stays within the range.
                let off = u32::try_from(i * len / want).unwrap_or(u32::MAX);
                self.first.saturating_add(off)
            })
            .collect())
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What one `fetch-once` child saw: one JSON line on its stdout.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FetchOnce {
    /// Whether a first message with at least one SVID arrived.
    pub ok: bool,
    /// The child's uid.
    pub uid: u32,
    /// From the start of `connect` to the first message (µs).
    pub latency_us: u64,
    /// From the start of `connect` to the connection being up (µs).
    pub connect_us: u64,
    /// The SPIFFE IDs in the first message.
    pub spiffe_ids: Vec<String>,
    /// The first SVID's leaf `notBefore` (Unix seconds), if it parsed.
    pub not_before_unix: Option<i64>,
    /// When the first message arrived (Unix ms).
    pub received_unix_ms: u64,
    /// Why it failed: a gRPC code name or `Connect`, `Timeout`, `NoMessage`, `NoSvid`.
    pub error: Option<String>,
}

impl FetchOnce {
    /// How long before the call the SVID was minted, given the agent backdates `notBefore` by
    /// `backdate`: `received - (notBefore + backdate)`, in seconds (about 0 for an SVID minted
    /// for this call).
    pub fn svid_age_s(&self, backdate: Duration) -> Option<f64> {
        let nb = self.not_before_unix?;
        Some(self.received_unix_ms as f64 / 1000.0 - nb as f64 - backdate.as_secs_f64())
    }
}

/// The `notBefore` (Unix seconds) of the first certificate in `der` (a leaf followed by its
/// chain, as the Workload API sends it).
pub fn leaf_not_before(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_before.timestamp())
}

/// `fetch-once`: connects to `socket`, opens `FetchX509SVID` and waits for the first message.
pub async fn fetch_once(socket: &Path) -> FetchOnce {
    let mut out = FetchOnce {
        uid: rustix::process::getuid().as_raw(),
        ..FetchOnce::default()
    };
    let start = Instant::now();
    let result = tokio::time::timeout(FETCH_TIMEOUT, async {
        let mut client = connect(socket).await.map_err(|_| "Connect".to_owned())?;
        let connected = start.elapsed();
        let mut stream = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .map_err(|s| code_name(&s))?
            .into_inner();
        match stream.message().await {
            Ok(Some(msg)) => Ok((connected, msg)),
            Ok(None) => Err("NoMessage".to_owned()),
            Err(s) => Err(code_name(&s)),
        }
    })
    .await
    .unwrap_or_else(|_| Err("Timeout".to_owned()));
    let took = start.elapsed();
    out.received_unix_ms = unix_ms(SystemTime::now());
    match result {
        Ok((connected, msg)) => {
            out.latency_us = micros(took);
            out.connect_us = micros(connected);
            out.spiffe_ids = msg.svids.iter().map(|s| s.spiffe_id.clone()).collect();
            out.not_before_unix = msg
                .svids
                .first()
                .and_then(|s| leaf_not_before(&s.x509_svid));
            out.ok = !msg.svids.is_empty();
            if !out.ok {
                out.error = Some("NoSvid".to_owned());
            }
        }
        Err(code) => out.error = Some(code),
    }
    out
}

/// A command running this binary (`exe`) as `uid`/`gid` when given.
fn child_command(exe: &Path, uid: Option<u32>, gid: Option<u32>) -> Command {
    let mut cmd = Command::new(exe);
    if let Some(uid) = uid {
        cmd.uid(uid);
    }
    if let Some(gid) = gid.or(uid) {
        cmd.gid(gid);
    }
    cmd.kill_on_drop(true);
    cmd
}

fn spawn_error(e: &std::io::Error, exe: &Path, uid: Option<u32>) -> anyhow::Error {
    match uid {
        Some(uid) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot start {} as uid {uid}: {e} (running children as other uids needs root)",
            exe.display()
        ),
        _ => anyhow::anyhow!("cannot start {}: {e}", exe.display()),
    }
}

/// The result of a `first-fetch` run: one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct FirstFetchReport {
    /// Always `first_fetch`.
    pub scenario: &'static str,
    /// Children started (one per uid).
    pub samples: usize,
    /// Children running at once.
    pub concurrency: usize,
    /// The uid range sampled.
    pub uids: UidRange,
    /// Children that got an SVID.
    pub ok: u64,
    /// Connect to first message, over the children that got an SVID.
    #[serde(flatten)]
    pub latency: Percentiles,
    /// Failures by cause (`Spawn`, `ChildOutput`, or the child's own).
    pub errors: ErrorCounts,
    /// SVIDs minted well before the call (the agent had pre-minted them).
    pub preminted: u64,
    /// SVIDs minted for the call (within [`FRESH_WITHIN`] of it).
    pub minted_for_call: u64,
    /// The median SVID age (s), see [`FetchOnce::svid_age_s`].
    pub svid_age_p50_s: Option<f64>,
    /// The `notBefore` backdating assumed (s).
    pub backdate_s: f64,
    /// The median time from spawning a child to its exit (µs), for reference.
    pub child_wall_p50_us: u32,
    /// The whole run (s).
    pub elapsed_s: f64,
}

impl FirstFetchReport {
    /// A readable summary.
    pub fn summary(&self) -> String {
        format!(
            "first-fetch {} uids ({}-{}), c={}: ok={} p50={}us p90={}us p99={}us max={}us errors={:?}\n  SVIDs pre-minted: {}, minted for the call: {}, median age {}s; child spawn-to-exit p50 {}us; {:.1}s",
            self.samples,
            self.uids.first,
            self.uids.last,
            self.concurrency,
            self.ok,
            self.latency.p50_us,
            self.latency.p90_us,
            self.latency.p99_us,
            self.latency.max_us,
            self.errors,
            self.preminted,
            self.minted_for_call,
            self.svid_age_p50_s
                .map_or_else(|| "-".to_owned(), |a| format!("{a:.1}")),
            self.child_wall_p50_us,
            self.elapsed_s,
        )
    }
}

/// Options of [`first_fetch`].
#[derive(Debug, Clone)]
pub struct FirstFetchOptions {
    /// The Workload API socket.
    pub socket: PathBuf,
    /// The binary to run as `fetch-once` (this one).
    pub exe: PathBuf,
    /// The uids to sample from.
    pub uids: UidRange,
    /// How many distinct uids (children).
    pub samples: usize,
    /// Children at once.
    pub concurrency: usize,
    /// The children's gid; `None`: the same number as the uid.
    pub gid: Option<u32>,
    /// Switch uid at all (`false`: children keep the loadgen's uid, for tests).
    pub switch_uid: bool,
    /// The agent's `notBefore` backdating.
    pub backdate: Duration,
}

/// Runs one `fetch-once` child as `uid`; returns its line and its wall time.
async fn run_fetch_child(
    opts: &FirstFetchOptions,
    uid: u32,
) -> Result<(FetchOnce, Duration), String> {
    let (uid_opt, gid_opt) = if opts.switch_uid {
        (Some(uid), Some(opts.gid.unwrap_or(uid)))
    } else {
        (None, None)
    };
    let mut cmd = child_command(&opts.exe, uid_opt, gid_opt);
    cmd.arg("fetch-once")
        .arg("--socket")
        .arg(&opts.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let child = cmd.spawn().map_err(|_| "Spawn".to_owned())?;
    let out = tokio::time::timeout(FETCH_TIMEOUT * 2, child.wait_with_output())
        .await
        .map_err(|_| "Timeout".to_owned())?
        .map_err(|_| "ChildOutput".to_owned())?;
    let wall = start.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| "ChildOutput".to_owned())?;
    let parsed: FetchOnce = serde_json::from_str(line).map_err(|_| "ChildOutput".to_owned())?;
    Ok((parsed, wall))
}

/// `first-fetch`: one child per uid of `opts.uids.spread(opts.samples)`, each as that uid,
/// `opts.concurrency` at a time.
pub async fn first_fetch(opts: &FirstFetchOptions) -> anyhow::Result<FirstFetchReport> {
    let uids = opts.uids.spread(opts.samples).map_err(anyhow::Error::msg)?;
    // Fail early, with the reason, if children cannot be started at all.
    if let Some(&uid) = uids.first() {
        let (u, g) = if opts.switch_uid {
            (Some(uid), Some(opts.gid.unwrap_or(uid)))
        } else {
            (None, None)
        };
        let mut probe = child_command(&opts.exe, u, g);
        probe
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = probe
            .status()
            .await
            .map_err(|e| spawn_error(&e, &opts.exe, u))?;
        anyhow::ensure!(
            status.success(),
            "{} --version as uid {uid} failed ({status}): can that uid execute it?",
            opts.exe.display()
        );
    }
    let start = Instant::now();
    let results: Vec<_> = futures::stream::iter(uids.iter().copied())
        .map(|uid| run_fetch_child(opts, uid))
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await;
    let elapsed = start.elapsed();
    let mut latencies = Vec::new();
    let mut walls = Vec::new();
    let mut ages = Vec::new();
    let mut errors = ErrorCounts::new();
    let (mut preminted, mut fresh) = (0, 0);
    for r in results {
        match r {
            Ok((f, wall)) if f.ok => {
                latencies.push(u32::try_from(f.latency_us).unwrap_or(u32::MAX));
                walls.push(u32::try_from(micros(wall)).unwrap_or(u32::MAX));
                if let Some(age) = f.svid_age_s(opts.backdate) {
                    ages.push(age);
                    if age > FRESH_WITHIN.as_secs_f64() {
                        preminted += 1;
                    } else {
                        fresh += 1;
                    }
                }
            }
            Ok((f, _)) => {
                let code = f.error.unwrap_or_else(|| "Unknown".to_owned());
                *errors.entry(code).or_default() += 1;
            }
            Err(code) => *errors.entry(code).or_default() += 1,
        }
    }
    ages.sort_by(f64::total_cmp);
    let age_p50 = ages.get(ages.len().saturating_sub(1) / 2).copied();
    Ok(FirstFetchReport {
        scenario: "first_fetch",
        samples: uids.len(),
        concurrency: opts.concurrency.max(1),
        uids: opts.uids,
        ok: latencies.len() as u64,
        latency: Percentiles::from_samples(latencies),
        errors,
        preminted,
        minted_for_call: fresh,
        svid_age_p50_s: age_p50.map(round3),
        backdate_s: opts.backdate.as_secs_f64(),
        child_wall_p50_us: Percentiles::from_samples(walls).p50_us,
        elapsed_s: round3(elapsed.as_secs_f64()),
    })
}

/// What a `hold` child is told (one line on its stdin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldCommand {
    /// Report the message counts now.
    Mark,
    /// Close every stream and exit.
    Stop,
}

impl FromStr for HoldCommand {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "mark" => Ok(Self::Mark),
            "stop" => Ok(Self::Stop),
            other => Err(format!("unknown command {other:?}: expected mark or stop")),
        }
    }
}

/// What a `hold` child reports (one JSON line on its stdout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HoldEvent {
    /// Every stream has its first message, or failed, or the ready timeout passed.
    Ready {
        /// Streams asked for.
        streams: usize,
        /// Streams that got their first message.
        ready: usize,
        /// Streams that failed.
        failed: usize,
        /// Failures by cause.
        errors: ErrorCounts,
        /// From the start to this event (ms).
        elapsed_ms: f64,
    },
    /// The counts at a `mark`.
    Mark {
        /// Messages after the first, over every stream.
        updates_total: u64,
        /// The fewest such messages on one ready stream.
        min_per_stream: u64,
        /// The most on one stream.
        max_per_stream: u64,
        /// Streams that have failed so far (including after being ready).
        failed: usize,
    },
}

/// Per-stream counts shared between the stream tasks and [`hold`].
#[derive(Debug)]
struct Tally {
    ready: Vec<AtomicBool>,
    updates: Vec<AtomicU64>,
    failed: AtomicU64,
}

impl Tally {
    fn new(n: usize) -> Self {
        Self {
            ready: (0..n).map(|_| AtomicBool::new(false)).collect(),
            updates: (0..n).map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicU64::new(0),
        }
    }

    fn mark(&self) -> HoldEvent {
        let (mut total, mut min, mut max) = (0, u64::MAX, 0);
        for (r, u) in self.ready.iter().zip(&self.updates) {
            if !r.load(Ordering::Relaxed) {
                continue;
            }
            let n = u.load(Ordering::Relaxed);
            total += n;
            min = min.min(n);
            max = max.max(n);
        }
        HoldEvent::Mark {
            updates_total: total,
            min_per_stream: if min == u64::MAX { 0 } else { min },
            max_per_stream: max,
            failed: usize::try_from(self.failed.load(Ordering::Relaxed)).unwrap_or(usize::MAX),
        }
    }
}

/// `hold`: opens `streams` `FetchX509SVID` streams over `connections` connections to `socket`
/// and keeps them open, counting the messages each receives after its first. Sends
/// [`HoldEvent::Ready`] on `events` once every stream is ready or failed (or `ready_timeout`
/// passed), then answers each [`HoldCommand::Mark`] with a [`HoldEvent::Mark`] until
/// [`HoldCommand::Stop`] or the end of `commands`.
pub async fn hold(
    socket: &Path,
    streams: usize,
    connections: usize,
    ready_timeout: Duration,
    mut commands: mpsc::Receiver<HoldCommand>,
    events: mpsc::Sender<HoldEvent>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut errors = ErrorCounts::new();
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        match connect(socket).await {
            Ok(c) => clients.push(c),
            Err(_) => *errors.entry("Connect".to_owned()).or_default() += 1,
        }
    }
    anyhow::ensure!(
        !clients.is_empty(),
        "could not connect to {}",
        socket.display()
    );
    let tally = Arc::new(Tally::new(streams));
    // Each stream reports once: Ok when ready, Err(code) when it failed before that.
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let mut set = JoinSet::new();
    for i in 0..streams {
        let mut client = clients[i % clients.len()].clone();
        let tally = tally.clone();
        let tx = tx.clone();
        set.spawn(async move {
            let mut stream = match client.fetch_x509svid(with_header(X509svidRequest {})).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Err(code_name(&s)));
                    return;
                }
            };
            let mut first = true;
            loop {
                let failure = match stream.message().await {
                    Ok(Some(_)) if first => {
                        first = false;
                        tally.ready[i].store(true, Ordering::Relaxed);
                        let _ = tx.send(Ok(()));
                        continue;
                    }
                    Ok(Some(_)) => {
                        tally.updates[i].fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(None) => "NoMessage".to_owned(),
                    Err(s) => code_name(&s),
                };
                tally.failed.fetch_add(1, Ordering::Relaxed);
                if first {
                    let _ = tx.send(Err(failure));
                }
                return;
            }
        });
    }
    drop(tx);
    let (mut ready, mut failed) = (0, 0);
    let deadline = tokio::time::Instant::now() + ready_timeout;
    while ready + failed < streams {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(()))) => ready += 1,
            Ok(Some(Err(code))) => {
                failed += 1;
                *errors.entry(code).or_default() += 1;
            }
            Ok(None) => break,
            Err(_) => {
                *errors.entry("Timeout".to_owned()).or_default() +=
                    (streams - ready - failed) as u64;
                break;
            }
        }
    }
    let ready_event = HoldEvent::Ready {
        streams,
        ready,
        failed,
        errors,
        elapsed_ms: round3(start.elapsed().as_secs_f64() * 1000.0),
    };
    if events.send(ready_event).await.is_err() {
        return Ok(());
    }
    while let Some(cmd) = commands.recv().await {
        match cmd {
            HoldCommand::Mark => {
                if events.send(tally.mark()).await.is_err() {
                    break;
                }
            }
            HoldCommand::Stop => break,
        }
    }
    set.abort_all();
    Ok(())
}

/// One group of streams held by a `hold` child.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StreamGroup {
    /// The child's uid (`None`: the loadgen's own).
    pub uid: Option<u32>,
    /// Streams.
    pub streams: usize,
    /// Connections they are spread over.
    pub connections: usize,
}

/// A running `hold` child.
struct HoldChild {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    label: &'static str,
}

impl HoldChild {
    async fn start(
        exe: &Path,
        socket: &Path,
        group: StreamGroup,
        ready_timeout: Duration,
        label: &'static str,
    ) -> anyhow::Result<(Self, HoldEvent)> {
        let mut cmd = child_command(exe, group.uid, group.uid);
        cmd.arg("hold")
            .arg("--socket")
            .arg(socket)
            .arg("--streams")
            .arg(group.streams.to_string())
            .arg("--connections")
            .arg(group.connections.to_string())
            .arg("--timeout")
            .arg(format!("{}ms", ready_timeout.as_millis()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|e| spawn_error(&e, exe, group.uid))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("the {label} child has no stdin/stdout pipe");
        };
        let mut me = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
            label,
        };
        let ready = me
            .next_event(ready_timeout + Duration::from_secs(30))
            .await?;
        Ok((me, ready))
    }

    async fn next_event(&mut self, wait: Duration) -> anyhow::Result<HoldEvent> {
        loop {
            let line = tokio::time::timeout(wait, self.stdout.next_line())
                .await
                .with_context(|| format!("the {} child said nothing for {wait:?}", self.label))?
                .with_context(|| format!("reading the {} child's output", self.label))?
                .with_context(|| format!("the {} child exited early", self.label))?;
            if line.starts_with('{') {
                return serde_json::from_str(&line)
                    .with_context(|| format!("the {} child wrote {line:?}", self.label));
            }
        }
    }

    async fn mark(&mut self) -> anyhow::Result<(u64, usize)> {
        self.stdin.write_all(b"mark\n").await?;
        self.stdin.flush().await?;
        match self.next_event(Duration::from_secs(30)).await? {
            HoldEvent::Mark {
                updates_total,
                failed,
                ..
            } => Ok((updates_total, failed)),
            other => anyhow::bail!("the {} child answered mark with {other:?}", self.label),
        }
    }

    async fn stop(mut self) {
        let _ = self.stdin.write_all(b"stop\n").await;
        let _ = self.stdin.flush().await;
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Options of [`partial_rotation`].
#[derive(Debug, Clone)]
pub struct PartialRotationOptions {
    /// The Workload API socket.
    pub socket: PathBuf,
    /// The binary to run as `hold` (this one).
    pub exe: PathBuf,
    /// The agent's pid (its CPU time and RSS are sampled).
    pub agent_pid: u32,
    /// The streams whose entry rotates.
    pub rotating: StreamGroup,
    /// The streams whose entry does not rotate in the window (`None` or 0 streams: none).
    pub idle: Option<StreamGroup>,
    /// How long to measure.
    pub window: Duration,
    /// How long to wait after every stream is ready before measuring.
    pub settle: Duration,
    /// How long the streams of one group may take to be ready.
    pub ready_timeout: Duration,
}

/// The result of a `partial-rotation` run: one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct PartialRotationReport {
    /// Always `partial_rotation`.
    pub scenario: &'static str,
    /// The rotating group.
    pub rotating: StreamGroup,
    /// Its streams that got their first message.
    pub rotating_ready: usize,
    /// The idle group, if any.
    pub idle: Option<StreamGroup>,
    /// Its streams that got their first message.
    pub idle_ready: usize,
    /// The measured window (s), between the two CPU samples.
    pub window_s: f64,
    /// Messages after the first received by the rotating streams in the window.
    pub rotating_updates: u64,
    /// Rotations in the window: `rotating_updates` per ready rotating stream.
    pub rotations: f64,
    /// Messages received by the idle streams in the window (0 when nothing they hold changed).
    pub idle_updates: u64,
    /// Streams that failed (either group, by the end of the window).
    pub failed: usize,
    /// Failures by cause while opening.
    pub errors: ErrorCounts,
    /// The agent's CPU time in the window (ms; see [`procstat::cpu_delta_ms`]).
    pub agent_cpu_ms: Option<f64>,
    /// `agent_cpu_ms / rotations` (ms).
    pub cpu_per_rotation_ms: Option<f64>,
    /// The agent before any stream was opened.
    pub agent_before: ProcSample,
    /// The agent at the start of the window.
    pub agent_start: ProcSample,
    /// The agent at the end of the window.
    pub agent_end: ProcSample,
}

impl PartialRotationReport {
    /// A readable summary.
    pub fn summary(&self) -> String {
        format!(
            "partial-rotation {} rotating + {} idle streams, {:.1}s: rotations={:.1} (updates {}), idle updates {}, agent cpu {} ms = {} ms/rotation, failed={} errors={:?}\n  agent before: {} | start: {} | end: {}",
            self.rotating_ready,
            self.idle_ready,
            self.window_s,
            self.rotations,
            self.rotating_updates,
            self.idle_updates,
            self.agent_cpu_ms
                .map_or_else(|| "?".to_owned(), |v| format!("{v:.1}")),
            self.cpu_per_rotation_ms
                .map_or_else(|| "?".to_owned(), |v| format!("{v:.3}")),
            self.failed,
            self.errors,
            self.agent_before,
            self.agent_start,
            self.agent_end,
        )
    }
}

fn add_ready_errors(into: &mut ErrorCounts, ev: &HoldEvent) -> usize {
    match ev {
        HoldEvent::Ready { ready, errors, .. } => {
            crate::stats::merge_errors(into, errors.clone());
            *ready
        }
        HoldEvent::Mark { .. } => 0,
    }
}

/// `partial-rotation`: starts the idle group's child (if any), then the rotating group's, waits
/// `settle`, and measures the agent's CPU time and the rotating streams' messages over `window`.
pub async fn partial_rotation(
    opts: &PartialRotationOptions,
) -> anyhow::Result<PartialRotationReport> {
    let agent_before = procstat::sample(opts.agent_pid);
    let mut errors = ErrorCounts::new();
    let idle_group = opts.idle.filter(|g| g.streams > 0);
    let mut idle = None;
    let mut idle_ready = 0;
    if let Some(g) = idle_group {
        let (child, ev) =
            HoldChild::start(&opts.exe, &opts.socket, g, opts.ready_timeout, "idle").await?;
        idle_ready = add_ready_errors(&mut errors, &ev);
        idle = Some(child);
    }
    let (mut rot, ev) = HoldChild::start(
        &opts.exe,
        &opts.socket,
        opts.rotating,
        opts.ready_timeout,
        "rotating",
    )
    .await?;
    let rotating_ready = add_ready_errors(&mut errors, &ev);
    tokio::time::sleep(opts.settle).await;

    let (r0, _) = rot.mark().await?;
    let i0 = match idle.as_mut() {
        Some(c) => c.mark().await?.0,
        None => 0,
    };
    let agent_start = procstat::sample(opts.agent_pid);
    let t0 = Instant::now();
    tokio::time::sleep(opts.window).await;
    let agent_end = procstat::sample(opts.agent_pid);
    let window = t0.elapsed();
    let (r1, rf) = rot.mark().await?;
    let (i1, idf) = match idle.as_mut() {
        Some(c) => c.mark().await?,
        None => (0, 0),
    };
    rot.stop().await;
    if let Some(c) = idle {
        c.stop().await;
    }
    let rotating_updates = r1.saturating_sub(r0);
    let rotations = if rotating_ready > 0 {
        rotating_updates as f64 / rotating_ready as f64
    } else {
        0.0
    };
    let agent_cpu_ms = procstat::cpu_delta_ms(&agent_start, &agent_end).map(round3);
    let cpu_per_rotation_ms = agent_cpu_ms
        .filter(|_| rotations > 0.0)
        .map(|c| round3(c / rotations));
    Ok(PartialRotationReport {
        scenario: "partial_rotation",
        rotating: opts.rotating,
        rotating_ready,
        idle: idle_group,
        idle_ready,
        window_s: round3(window.as_secs_f64()),
        rotating_updates,
        rotations: round3(rotations),
        idle_updates: i1.saturating_sub(i0),
        failed: rf + idf,
        errors,
        agent_cpu_ms,
        cpu_per_rotation_ms,
        agent_before,
        agent_start,
        agent_end,
    })
}

/// The result of an `admin-create` run: one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct AdminCreateReport {
    /// Always `admin_create`.
    pub scenario: &'static str,
    /// Calls made (one entry each).
    pub count: usize,
    /// Entries created.
    pub ok: u64,
    /// Connect plus `CreateEntries` (µs), over the created entries.
    pub with_connect: Percentiles,
    /// `CreateEntries` alone (µs).
    pub rpc: Percentiles,
    /// Failures by cause (`Connect`, a gRPC code, or `Refused` for an entry error).
    pub errors: ErrorCounts,
    /// The first failure's message, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl AdminCreateReport {
    /// A readable summary.
    pub fn summary(&self) -> String {
        format!(
            "admin-create {} single entries: ok={} CreateEntries p50={}us p90={}us max={}us; with connect p50={}us p90={}us; errors={:?}{}",
            self.count,
            self.ok,
            self.rpc.p50_us,
            self.rpc.p90_us,
            self.rpc.max_us,
            self.with_connect.p50_us,
            self.with_connect.p90_us,
            self.errors,
            self.first_error
                .as_deref()
                .map_or_else(String::new, |e| format!(" (first: {e})")),
        )
    }
}

/// The entry `admin-create` makes for `uid`.
pub fn admin_create_spec(trust_domain: &str, uid: u32, x509_svid_ttl_seconds: u64) -> EntrySpec {
    EntrySpec {
        spiffe_id: format!("spiffe://{trust_domain}/scale/admin-create/{uid}"),
        selectors: vec![format!("unix:uid:{uid}")],
        x509_svid_ttl_seconds,
        jwt_svid_ttl_seconds: 0,
        hint: String::new(),
        dns_names: Vec::new(),
        admin: false,
        federates_with: Vec::new(),
    }
}

/// `admin-create`: `count` calls, each on a new connection to `admin_socket`, each creating one
/// entry `unix:uid:U` for U = `first_uid`, `first_uid + 1`, ...
pub async fn admin_create(
    admin_socket: &Path,
    count: usize,
    first_uid: u32,
    trust_domain: &str,
    x509_svid_ttl_seconds: u64,
) -> anyhow::Result<AdminCreateReport> {
    let mut with_connect = Vec::new();
    let mut rpc = Vec::new();
    let mut errors = ErrorCounts::new();
    let mut first_error = None;
    let mut fail = |errors: &mut ErrorCounts, code: &str, msg: String| {
        *errors.entry(code.to_owned()).or_default() += 1;
        first_error.get_or_insert(msg);
    };
    for i in 0..count {
        let uid = first_uid.saturating_add(u32::try_from(i).unwrap_or(u32::MAX));
        let spec = admin_create_spec(trust_domain, uid, x509_svid_ttl_seconds);
        let t0 = Instant::now();
        let mut client = match channel(admin_socket).await {
            Ok(c) => EntryAdminClient::new(c),
            Err(e) => {
                fail(&mut errors, "Connect", format!("connect: {e}"));
                continue;
            }
        };
        let t1 = Instant::now();
        let resp = client
            .create_entries(CreateEntriesRequest {
                entries: vec![spec],
            })
            .await;
        let (rpc_took, total) = (t1.elapsed(), t0.elapsed());
        match resp {
            Ok(r) => match r.into_inner().results.first() {
                Some(res) if res.error.is_none() && res.entry.is_some() => {
                    rpc.push(u32::try_from(micros(rpc_took)).unwrap_or(u32::MAX));
                    with_connect.push(u32::try_from(micros(total)).unwrap_or(u32::MAX));
                }
                Some(res) => fail(
                    &mut errors,
                    "Refused",
                    res.error
                        .as_ref()
                        .map_or_else(String::new, |e| format!("{}: {}", e.field, e.message)),
                ),
                None => fail(&mut errors, "NoResult", "no result".to_owned()),
            },
            Err(s) => fail(&mut errors, &code_name(&s), s.message().to_owned()),
        }
    }
    Ok(AdminCreateReport {
        scenario: "admin_create",
        count,
        ok: rpc.len() as u64,
        with_connect: Percentiles::from_samples(with_connect),
        rpc: Percentiles::from_samples(rpc),
        errors,
        first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_parse_and_refuse_nonsense() {
        assert_eq!(
            "200000-299999".parse::<UidRange>(),
            Ok(UidRange {
                first: 200_000,
                last: 299_999
            })
        );
        assert_eq!("7".parse::<UidRange>(), Ok(UidRange { first: 7, last: 7 }));
        assert!(
            "9-3"
                .parse::<UidRange>()
                .is_err_and(|e| e.contains("empty"))
        );
        assert!(
            "a-3"
                .parse::<UidRange>()
                .is_err_and(|e| e.contains("FIRST-LAST"))
        );
        assert!("".parse::<UidRange>().is_err());
        assert_eq!("1-10".parse::<UidRange>().map(|r| r.len()), Ok(10));
    }

    #[test]
    fn spread_picks_distinct_uids_across_the_range() {
        let r = UidRange {
            first: 200_000,
            last: 299_999,
        };
        let uids = r.spread(1000).unwrap();
        assert_eq!(uids.len(), 1000);
        assert_eq!(uids[0], 200_000);
        assert!(uids.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
        assert!(*uids.last().unwrap() >= 299_800 && *uids.last().unwrap() <= 299_999);
        // Every uid of a range, when asked for all of them.
        let small = UidRange { first: 5, last: 9 };
        assert_eq!(small.spread(5).unwrap(), vec![5, 6, 7, 8, 9]);
        assert!(small.spread(6).is_err_and(|e| e.contains("1 to 5")));
        assert!(small.spread(0).is_err());
        // The top of the uid space does not overflow.
        let top = UidRange {
            first: u32::MAX - 2,
            last: u32::MAX,
        };
        assert_eq!(
            top.spread(3).unwrap(),
            vec![u32::MAX - 2, u32::MAX - 1, u32::MAX]
        );
    }

    #[test]
    fn svid_age_tells_preminted_from_fresh() {
        let backdate = Duration::from_secs(10);
        // Minted for the call: notBefore = now - 10 s (whole seconds).
        let fresh = FetchOnce {
            not_before_unix: Some(1_000_000 - 10),
            received_unix_ms: 1_000_000_400,
            ..FetchOnce::default()
        };
        let age = fresh.svid_age_s(backdate).unwrap();
        assert!(age < FRESH_WITHIN.as_secs_f64(), "{age}");
        // Minted 5 minutes earlier.
        let old = FetchOnce {
            not_before_unix: Some(1_000_000 - 310),
            received_unix_ms: 1_000_000_400,
            ..FetchOnce::default()
        };
        assert!(old.svid_age_s(backdate).unwrap() > 299.0);
        assert_eq!(FetchOnce::default().svid_age_s(backdate), None);
    }

    #[test]
    fn hold_commands_parse() {
        assert_eq!("mark\n".parse(), Ok(HoldCommand::Mark));
        assert_eq!("stop".parse(), Ok(HoldCommand::Stop));
        assert!(
            "go".parse::<HoldCommand>()
                .is_err_and(|e| e.contains("mark or stop"))
        );
    }

    #[test]
    fn hold_events_round_trip_as_tagged_json() {
        let ev = HoldEvent::Mark {
            updates_total: 30,
            min_per_stream: 2,
            max_per_stream: 4,
            failed: 1,
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert!(line.contains("\"event\":\"mark\""), "{line}");
        assert_eq!(serde_json::from_str::<HoldEvent>(&line).unwrap(), ev);
    }

    #[test]
    fn tally_counts_only_ready_streams() {
        let t = Tally::new(3);
        t.ready[0].store(true, Ordering::Relaxed);
        t.ready[1].store(true, Ordering::Relaxed);
        t.updates[0].store(5, Ordering::Relaxed);
        t.updates[1].store(3, Ordering::Relaxed);
        t.failed.store(1, Ordering::Relaxed);
        assert_eq!(
            t.mark(),
            HoldEvent::Mark {
                updates_total: 8,
                min_per_stream: 3,
                max_per_stream: 5,
                failed: 1
            }
        );
        assert_eq!(
            Tally::new(2).mark(),
            HoldEvent::Mark {
                updates_total: 0,
                min_per_stream: 0,
                max_per_stream: 0,
                failed: 0
            }
        );
    }

    #[test]
    fn admin_spec_names_the_uid() {
        let s = admin_create_spec("example.org", 190_001, 0);
        assert_eq!(
            s.spiffe_id,
            "spiffe://example.org/scale/admin-create/190001"
        );
        assert_eq!(s.selectors, vec!["unix:uid:190001".to_owned()]);
        assert!(!s.admin);
    }

    #[test]
    fn leaf_not_before_reads_the_first_certificate() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let mut der = ck.cert.der().to_vec();
        // A chain: the first certificate counts.
        der.extend_from_slice(ck.cert.der());
        let nb = leaf_not_before(&der).unwrap();
        // rcgen's default notBefore is 1975-01-01.
        assert_eq!(nb, 157_766_400);
        assert_eq!(leaf_not_before(b"not a certificate"), None);
    }
}
