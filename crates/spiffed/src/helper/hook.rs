//! After an update: a signal to the pid in `pid_file_name` and/or a run of `cmd`, beside the
//! helper, never in its way.
//!
//! One task runs the hooks, at most one run at a time. [`Hooks::trigger`] never waits: it
//! leaves a wake-up (tokio's `Notify` keeps at most one), so updates that arrive while a run
//! is under way coalesce into one more run after it, for the newest files. A command that
//! outlives `cmd_timeout` is killed with its process group and logged; the files of later
//! updates are written meanwhile, since the writer never waits for the hook.

use std::os::fd::AsFd as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::config::PidSignal;
use super::log;
use super::metrics::Metrics;

/// What runs after an update.
#[derive(Debug, Clone)]
pub(crate) struct HookSpec {
    /// The signal to send to the pid in a file.
    pub(crate) signal: Option<PidSignal>,
    /// The command (argv).
    pub(crate) cmd: Option<Vec<String>>,
    /// How long the command may run.
    pub(crate) timeout: Duration,
}

/// The hook runner: a task and its wake-up.
pub(crate) struct Hooks {
    wake: Arc<Notify>,
    /// The newest update triggered.
    latest: Arc<AtomicU64>,
    /// True while a run is under way.
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Hooks {
    /// Starts the runner, or nothing when no hook is configured.
    pub(crate) fn start(spec: HookSpec, metrics: Arc<Metrics>) -> Option<Self> {
        if spec.signal.is_none() && spec.cmd.is_none() {
            return None;
        }
        let wake = Arc::new(Notify::new());
        let latest = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(
            spec,
            wake.clone(),
            latest.clone(),
            running.clone(),
            metrics,
        ));
        Some(Self {
            wake,
            latest,
            running,
            task,
        })
    }

    /// Asks for a run for update `number`; returns at once.
    pub(crate) fn trigger(&self, number: u64) {
        self.latest.store(number, Ordering::SeqCst);
        if self.running.load(Ordering::SeqCst) {
            log::info(format_args!(
                "update #{number}: the hook of an earlier update still runs; it runs once more \
                 when that one ends (updates meanwhile are coalesced)"
            ));
        }
        self.wake.notify_one();
    }
}

impl Drop for Hooks {
    /// Ends the runner; a running command is killed with its process group (kill_on_drop and
    /// the group kill in [`run_cmd`]'s guard).
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    spec: HookSpec,
    wake: Arc<Notify>,
    latest: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    loop {
        wake.notified().await;
        running.store(true, Ordering::SeqCst);
        let number = latest.load(Ordering::SeqCst);
        if let Some(signal) = &spec.signal {
            let ok = send_signal(signal, number).await;
            metrics.hook_ran("signal", if ok { "ok" } else { "failed" });
        }
        if let Some(argv) = &spec.cmd {
            let result = run_cmd(argv, number, spec.timeout).await;
            metrics.hook_ran("cmd", result);
        }
        running.store(false, Ordering::SeqCst);
    }
}

/// Reads the pid file and sends the signal; tries three times, 100 ms then 200 ms apart (the
/// process may be restarting and rewriting its pid file). Returns whether it was sent.
async fn send_signal(signal: &PidSignal, number: u64) -> bool {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match signal_once(signal) {
            Ok(pid) => {
                log::info(format_args!(
                    "update #{number}: sent {} to pid {pid} (from {})",
                    signal.name,
                    signal.pid_file.display()
                ));
                return true;
            }
            Err(e) if attempt >= 3 => {
                log::error(format_args!(
                    "update #{number}: cannot send {}: {e}; the next update tries again",
                    signal.name
                ));
                return false;
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

fn signal_once(signal: &PidSignal) -> Result<i32, String> {
    let text = std::fs::read_to_string(&signal.pid_file)
        .map_err(|e| format!("cannot read {}: {e}", signal.pid_file.display()))?;
    let raw: i32 = text.trim().parse().map_err(|_| {
        format!(
            "{} does not hold a pid: {:?}",
            signal.pid_file.display(),
            text.trim()
        )
    })?;
    let pid = rustix::process::Pid::from_raw(raw)
        .filter(|_| raw > 0)
        .ok_or_else(|| format!("{} holds pid {raw}", signal.pid_file.display()))?;
    rustix::process::kill_process(pid, signal.signal).map_err(|e| format!("kill({raw}): {e}"))?;
    Ok(raw)
}

/// Runs the command in its own process group, its output on our stderr, and waits for it up
/// to `timeout`. Returns the outcome for the metric: `ok`, `failed` or `timeout`.
async fn run_cmd(argv: &[String], number: u64, timeout: Duration) -> &'static str {
    let Some((program, args)) = argv.split_first() else {
        return "failed";
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    if let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() {
        command.stdout(std::process::Stdio::from(stderr));
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            log::error(format_args!(
                "update #{number}: cannot run {}: {e}",
                Path::new(program).display()
            ));
            return "failed";
        }
    };
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    // Kills the group if this future is dropped (the helper stops) while the command runs.
    let mut guard = GroupGuard(group);
    let outcome = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            log::info(format_args!("update #{number}: cmd succeeded"));
            "ok"
        }
        Ok(Ok(status)) => {
            log::error(format_args!("update #{number}: cmd failed ({status})"));
            "failed"
        }
        Ok(Err(e)) => {
            log::error(format_args!("update #{number}: cannot wait for cmd: {e}"));
            "failed"
        }
        Err(_elapsed) => {
            kill_group(group);
            let _ = child.wait().await;
            log::error(format_args!(
                "update #{number}: cmd still running after {} (cmd_timeout); killed it and its \
                 process group",
                humantime::format_duration(timeout)
            ));
            "timeout"
        }
    };
    // The command is over: nothing left to kill (its pid may be reused).
    guard.0 = None;
    outcome
}

/// Kills a command's process group when dropped.
struct GroupGuard(Option<rustix::process::Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

/// SIGKILL to a process group.
fn kill_group(group: Option<rustix::process::Pid>) {
    if let Some(pgid) = group {
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn updates_during_a_run_coalesce_into_one_more_run() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("runs");
        let script = format!(
            "echo start >> {0}; sleep 0.5; echo end >> {0}",
            out.display()
        );
        let hooks = Hooks::start(
            HookSpec {
                signal: None,
                cmd: Some(vec!["sh".into(), "-c".into(), script]),
                timeout: Duration::from_secs(10),
            },
            Arc::new(Metrics::default()),
        )
        .unwrap();
        hooks.trigger(1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        for n in 2..6 {
            hooks.trigger(n);
        }
        tokio::time::sleep(Duration::from_millis(1800)).await;
        let runs = std::fs::read_to_string(&out).unwrap();
        // Two runs, one after the other: never two at once, and not one per update.
        assert_eq!(runs, "start\nend\nstart\nend\n");
    }

    #[tokio::test]
    async fn a_hung_command_is_killed_at_the_timeout() {
        let started = tokio::time::Instant::now();
        let outcome = run_cmd(
            &["sleep".into(), "987653".into()],
            1,
            Duration::from_millis(300),
        )
        .await;
        assert_eq!(outcome, "timeout");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
