//! `spiffed api watch`: stream X.509 contexts, print each, write files, run a reload command.
//!
//! Retry follows CONFORMANCE item 22 (and go-spiffe's watch loop): `InvalidArgument` ends the
//! watch at once with exit 1; everything else (PermissionDenied, Unavailable, the stream
//! ending, a missing socket) reconnects after an exponential backoff with jitter, 200 ms
//! doubling to 30 s, reset by every message received. Each message replaces the state (item
//! 112). Ctrl-C or SIGTERM ends the watch with exit 0.
//!
//! Nothing an update does may stop the next one: a failed file write (a full disk) is logged,
//! the previous files stay as they were, and the next update writes again; the `--exec`
//! command runs in its own process group beside the watch, is killed (the whole group) after
//! `--exec-timeout`, and is killed too if it is still running when the next update arrives, so
//! that the command always reloads the newest files. When standard output fails, a watch
//! that only prints ends (quietly on a closed pipe, exit 141); one that writes files or runs a
//! command says so once and goes on without printing.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::os::fd::AsFd as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt as _;
use spiffe::X509Context;

use super::{ClientError, SocketAddress, WatchArgs, X509Report, connect, files, report, within};
use crate::cli_common::output::{OutputFormat, err, out};

/// The first reconnect delay.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// The longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Exponential backoff with ±20% jitter.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// The next delay before jitter.
    next: Duration,
    /// The first delay.
    min: Duration,
    /// The cap.
    max: Duration,
}

impl Backoff {
    /// A backoff from `min` doubling to `max`.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }

    /// The delay before the next attempt, given a random fraction in `[0, 1)` for jitter.
    pub(crate) fn next_delay_with(&mut self, random: f64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // 0.8 ..= 1.2 times the base, never above the cap.
        let factor = 0.8 + 0.4 * random.clamp(0.0, 1.0);
        base.mul_f64(factor).min(self.max)
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_delay_with(random_fraction())
    }

    /// Back to the first delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A random fraction in `[0, 1)`, from the std library's per-process random hash keys.
fn random_fraction() -> f64 {
    let bits = RandomState::new().hash_one(0u8) >> 11;
    // 53 bits fit an f64 mantissa exactly.
    #[allow(clippy::cast_precision_loss, reason = "53 bits convert exactly")]
    let value = bits as f64;
    value / (1u64 << 53) as f64
}

/// Runs the watch until Ctrl-C/SIGTERM (exit 0) or a final error.
pub(crate) async fn run(
    addr: &SocketAddress,
    args: &WatchArgs,
    output: OutputFormat,
    timeout: Duration,
) -> Result<ExitCode, ClientError> {
    tokio::select! {
        result = watch_loop(addr, args, output, timeout) => result,
        () = shutdown_signal() => {
            err("spiffed: watch: stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM. If a handler cannot be installed, that signal is not awaited.
pub(crate) async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = terminate => {}
        () = interrupt => {}
    }
}

/// Connects, streams, and reconnects with backoff until a final error.
async fn watch_loop(
    addr: &SocketAddress,
    args: &WatchArgs,
    output: OutputFormat,
    timeout: Duration,
) -> Result<ExitCode, ClientError> {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let mut watcher = Watcher {
        args,
        output,
        printing: true,
        exec: None,
        updates: 0,
    };
    loop {
        let e = stream_once(addr, timeout, &mut backoff, &mut watcher).await;
        if !e.is_retryable() {
            return Err(e);
        }
        let delay = backoff.next_delay();
        err(format_args!(
            "spiffed: watch: {e}; reconnecting in {}",
            humantime::format_duration(round_ms(delay))
        ));
        tokio::time::sleep(delay).await;
    }
}

/// A duration rounded to whole milliseconds, for messages.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One connection: connect and wait for the first message within `timeout`, then handle
/// messages until the stream fails or ends. Returns why it stopped.
async fn stream_once(
    addr: &SocketAddress,
    timeout: Duration,
    backoff: &mut Backoff,
    watcher: &mut Watcher<'_>,
) -> ClientError {
    let started = tokio::time::Instant::now();
    let api = |e| ClientError::from_api(&addr.path, e);
    let first = within(addr, timeout, async {
        let client = connect(addr).await?;
        let mut stream = client.stream_x509_contexts().await.map_err(api)?;
        let first = stream.next().await;
        Ok((stream, first))
    })
    .await;
    let (mut stream, mut next) = match first {
        Ok(pair) => pair,
        Err(e) => return e,
    };
    let mut elapsed = Some(started.elapsed());
    loop {
        match next {
            Some(Ok(context)) => {
                backoff.reset();
                if let Err(e) = watcher.update(&context, elapsed.take()).await {
                    return e;
                }
            }
            Some(Err(e)) => return api(e),
            None => {
                return ClientError::StreamEnded {
                    path: addr.path.clone(),
                };
            }
        }
        next = stream.next().await;
    }
}

/// What the watch carries from one update to the next.
struct Watcher<'a> {
    args: &'a WatchArgs,
    output: OutputFormat,
    /// False once standard output failed (and the watch went on for its files or command).
    printing: bool,
    /// The `--exec` command of an earlier update, maybe still running.
    exec: Option<Exec>,
    /// Updates received so far.
    updates: u64,
}

impl Watcher<'_> {
    /// Prints one update, writes the files, and starts the command. Only a failure of
    /// standard output in a watch that does nothing else ends the watch; everything else is
    /// logged, and the next update may succeed.
    async fn update(
        &mut self,
        context: &X509Context,
        elapsed: Option<Duration>,
    ) -> Result<(), ClientError> {
        self.updates += 1;
        let number = self.updates;
        if self.printing
            && let Err(e) = self.print(context, number, elapsed)
        {
            if self.args.write.is_none() && self.args.exec.is_none() {
                return Err(e);
            }
            self.printing = false;
            err(format_args!(
                "spiffed: watch: {e}; no longer printing updates (files and --exec go on)"
            ));
        }
        if let Some(dir) = &self.args.write
            && let Err(e) = write_files(dir, context).await
        {
            err(format_args!(
                "spiffed: watch: update #{number}: {e}; the previous files are kept, and the next \
                 update writes them again; not running --exec"
            ));
            return Ok(());
        }
        if let Some(cmd) = &self.args.exec {
            if let Some(previous) = self.exec.take()
                && previous.is_running()
            {
                err(format_args!(
                    "spiffed: watch: update #{number}: the --exec command of update #{} is still \
                     running; killing it to run the command for this update",
                    previous.number
                ));
            }
            self.exec = Some(Exec::start(cmd, number, self.args.exec_timeout));
        }
        Ok(())
    }

    /// Prints one update on standard output.
    fn print(
        &self,
        context: &X509Context,
        number: u64,
        elapsed: Option<Duration>,
    ) -> Result<(), ClientError> {
        let now = report::rfc3339(time::OffsetDateTime::now_utc());
        let report = match X509Report::from_context(context, elapsed) {
            Ok(report) => report,
            Err(e) => {
                err(format_args!("spiffed: watch: update #{number}: {e}"));
                return Ok(());
            }
        };
        match self.output {
            OutputFormat::Text => {
                out(format_args!(
                    "[{now}] update #{number}\n{}\n",
                    report.render_text()
                ))?;
            }
            OutputFormat::Json => {
                let mut json = report.to_json();
                if let Some(obj) = json.as_object_mut() {
                    obj.insert("time".into(), now.into());
                    obj.insert("update".into(), number.into());
                }
                out(json)?;
            }
        }
        Ok(())
    }
}

/// Writes the files off the async threads.
async fn write_files(dir: &Path, context: &X509Context) -> Result<(), ClientError> {
    let dir = dir.to_path_buf();
    let context = context.clone();
    match tokio::task::spawn_blocking(move || files::write_x509_context(&dir, &context)).await {
        Ok(result) => result.map(|_written| ()).map_err(ClientError::from),
        Err(join) => Err(files::WriteError::WriterStopped(join.to_string()).into()),
    }
}

/// One run of the `--exec` command: `sh -c CMD` in its own process group, waited for (and
/// killed after its timeout) by a task of its own. Dropping it kills the whole group if it is
/// still running, so no command outlives the watch or the next update.
struct Exec {
    /// The update it was started for.
    number: u64,
    /// Its process group (the shell's pid), `None` if it could not be started.
    group: Option<rustix::process::Pid>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Exec {
    fn start(cmd: &str, number: u64, timeout: Duration) -> Self {
        let mut command = tokio::process::Command::new("sh");
        command
            .arg("-c")
            .arg(cmd)
            .kill_on_drop(true)
            .process_group(0);
        // The command's output goes to stderr, so it never mixes into our stdout (JSON lines).
        if let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() {
            command.stdout(std::process::Stdio::from(stderr));
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                err(format_args!(
                    "spiffed: watch: update #{number}: cannot run sh -c {cmd:?}: {e}"
                ));
                return Self {
                    number,
                    group: None,
                    task: None,
                };
            }
        };
        let group = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw);
        let task = tokio::spawn(async move {
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) if status.success() => {
                    err(format_args!(
                        "spiffed: watch: update #{number}: --exec command succeeded"
                    ));
                }
                Ok(Ok(status)) => err(format_args!(
                    "spiffed: watch: update #{number}: --exec command failed ({status})"
                )),
                Ok(Err(e)) => err(format_args!(
                    "spiffed: watch: update #{number}: cannot wait for the --exec command: {e}"
                )),
                Err(_elapsed) => {
                    kill_group(group);
                    let _ = child.wait().await;
                    err(format_args!(
                        "spiffed: watch: update #{number}: --exec command still running after \
                         {} (--exec-timeout); killed it and its process group",
                        humantime::format_duration(timeout)
                    ));
                }
            }
        });
        Self {
            number,
            group,
            task: Some(task),
        }
    }

    fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        if let Some(task) = self.task.take()
            && !task.is_finished()
        {
            // Stop the waiter first, so that the kill is not reported as a failed command.
            task.abort();
            kill_group(self.group);
        }
    }
}

/// SIGKILL to a command's process group (the shell and everything it started).
fn kill_group(group: Option<rustix::process::Pid>) {
    if let Some(pgid) = group {
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli_common::Failure as _;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        // No jitter at random = 0.5.
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay_with(0.5)).collect();
        assert_eq!(delays.first(), Some(&Duration::from_millis(200)));
        assert_eq!(delays.get(1), Some(&Duration::from_millis(400)));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays.last(), Some(&MAX_BACKOFF));
        b.reset();
        assert_eq!(b.next_delay_with(0.5), MIN_BACKOFF);
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_under_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let low = b.next_delay_with(0.0);
        b.reset();
        let high = b.next_delay_with(1.0);
        assert_eq!(low, Duration::from_millis(800));
        assert_eq!(high, Duration::from_millis(1200));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        let r = random_fraction();
        assert!((0.0..1.0).contains(&r), "{r}");
    }

    #[test]
    fn only_invalid_argument_and_bad_addresses_are_final() {
        let path = std::path::PathBuf::from("/x.sock");
        let no_socket = crate::cli_common::socket::SocketError::NoSocket {
            api: crate::cli_common::socket::Api::Workload,
            path: path.clone(),
        };
        assert!(ClientError::from(no_socket).is_retryable());
        assert!(ClientError::NoIdentityIssued { uid: 1 }.is_retryable());
        assert!(ClientError::StreamEnded { path: path.clone() }.is_retryable());
        let rejected = ClientError::from_api(
            &path,
            spiffe::WorkloadApiError::Transport(spiffe::transport::TransportError::status(
                spiffe::transport::GrpcStatusCode::InvalidArgument,
                "missing header",
            )),
        );
        assert!(matches!(rejected, ClientError::Rejected { .. }));
        assert!(!rejected.is_retryable());
        let unavailable = ClientError::from_api(
            &path,
            spiffe::WorkloadApiError::Transport(spiffe::transport::TransportError::status(
                spiffe::transport::GrpcStatusCode::Unavailable,
                "attestation failed",
            )),
        );
        assert!(unavailable.is_retryable());
    }

    /// A Workload API that fails every call with one status and records each call's arrival
    /// and whether it carried the `workload.spiffe.io: true` header.
    mod fake {
        use std::sync::{Arc, Mutex};

        use futures::stream::BoxStream;
        use spiffed_proto::workload::spiffe_workload_api_server::{
            SpiffeWorkloadApi, SpiffeWorkloadApiServer,
        };
        use spiffed_proto::workload::*;
        use tonic::{Code, Request, Response, Status};

        pub(super) type Calls = Arc<Mutex<Vec<(tokio::time::Instant, bool)>>>;

        struct Failing {
            code: Code,
            calls: Calls,
        }

        impl Failing {
            fn fail<T, R>(&self, req: &Request<T>) -> Result<R, Status> {
                let header = req
                    .metadata()
                    .get("workload.spiffe.io")
                    .is_some_and(|v| v == "true");
                self.calls
                    .lock()
                    .unwrap()
                    .push((tokio::time::Instant::now(), header));
                Err(Status::new(self.code, "scripted failure"))
            }
        }

        #[tonic::async_trait]
        impl SpiffeWorkloadApi for Failing {
            type FetchX509SVIDStream = BoxStream<'static, Result<X509svidResponse, Status>>;
            type FetchX509BundlesStream = BoxStream<'static, Result<X509BundlesResponse, Status>>;
            type FetchJWTBundlesStream = BoxStream<'static, Result<JwtBundlesResponse, Status>>;
            type FetchWITSVIDStream = BoxStream<'static, Result<WitsvidResponse, Status>>;
            type FetchWITBundlesStream = BoxStream<'static, Result<WitBundlesResponse, Status>>;
            async fn fetch_x509svid(
                &self,
                r: Request<X509svidRequest>,
            ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
                self.fail(&r)
            }
            async fn fetch_x509_bundles(
                &self,
                r: Request<X509BundlesRequest>,
            ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
                self.fail(&r)
            }
            async fn fetch_jwtsvid(
                &self,
                r: Request<JwtsvidRequest>,
            ) -> Result<Response<JwtsvidResponse>, Status> {
                self.fail(&r)
            }
            async fn fetch_jwt_bundles(
                &self,
                r: Request<JwtBundlesRequest>,
            ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
                self.fail(&r)
            }
            async fn validate_jwtsvid(
                &self,
                r: Request<ValidateJwtsvidRequest>,
            ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
                self.fail(&r)
            }
            async fn fetch_witsvid(
                &self,
                r: Request<WitsvidRequest>,
            ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
                self.fail(&r)
            }
            async fn fetch_wit_bundles(
                &self,
                r: Request<WitBundlesRequest>,
            ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
                self.fail(&r)
            }
        }

        /// Serves the fake on `path` in the background; returns its call log.
        pub(super) fn serve(path: &std::path::Path, code: Code) -> Calls {
            let calls = Calls::default();
            let listener = tokio::net::UnixListener::bind(path).unwrap();
            let service = SpiffeWorkloadApiServer::new(Failing {
                code,
                calls: calls.clone(),
            });
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
            );
            calls
        }
    }

    fn watch_args() -> WatchArgs {
        WatchArgs {
            write: None,
            exec: None,
            exec_timeout: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn invalid_argument_ends_the_watch_at_once_without_retry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let calls = fake::serve(&path, tonic::Code::InvalidArgument);
        let addr = super::super::address::resolve(path.to_str(), None).unwrap();
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            watch_loop(
                &addr,
                &watch_args(),
                OutputFormat::Json,
                Duration::from_secs(5),
            ),
        )
        .await
        .expect("the watch ends by itself");
        let err = result.unwrap_err();
        assert!(matches!(err, ClientError::Rejected { .. }), "{err}");
        assert_eq!(err.exit_code(), ExitCode::FAILURE);
        // Give a wrongly scheduled retry the time to show up.
        tokio::time::sleep(MIN_BACKOFF * 2).await;
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "exactly one attempt");
        assert!(
            calls.iter().all(|(_, header)| *header),
            "the header on every call"
        );
    }

    #[tokio::test]
    async fn permission_denied_is_retried_with_growing_delays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let calls = fake::serve(&path, tonic::Code::PermissionDenied);
        let addr = super::super::address::resolve(path.to_str(), None).unwrap();
        // 200 ms, 400 ms, 800 ms (each ±20%): four attempts within about 1.5 s.
        let watching = tokio::time::timeout(
            Duration::from_millis(2100),
            watch_loop(
                &addr,
                &watch_args(),
                OutputFormat::Text,
                Duration::from_secs(5),
            ),
        )
        .await;
        assert!(watching.is_err(), "PermissionDenied does not end the watch");
        let calls = calls.lock().unwrap();
        assert!(calls.len() >= 4, "{} attempts", calls.len());
        assert!(
            calls.iter().all(|(_, header)| *header),
            "the header on every call"
        );
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(
            gaps.windows(2).all(|g| g[1] > g[0]),
            "delays grow: {gaps:?}"
        );
    }
}
