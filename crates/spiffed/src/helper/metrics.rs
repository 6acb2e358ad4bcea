//! What `spiffed helper` knows about its files, for Prometheus (`GET /metrics`, text format
//! 0.0.4) and probes (`GET /ready`), on `--metrics-listen IP:PORT`.
//!
//! The expiry gauges are computed when scraped, from the validity of the files on disk, so
//! `spiffed_helper_file_near_expiry` turns 1 by itself when no update came in time. The HTTP
//! side follows the agent's endpoints: GET/HEAD only, one request per connection, a request
//! head of at most 8 KiB within 5 s, at most 32 connections.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::log;

/// Within this share of their lifetime before expiry, files are "near expiry".
pub(crate) const NEAR_EXPIRY_SHARE: f64 = 0.10;

/// The validity of one file's credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Validity {
    /// From.
    pub(crate) not_before: SystemTime,
    /// Until.
    pub(crate) not_after: SystemTime,
}

impl Validity {
    /// When the file enters the last 10% of its lifetime.
    pub(crate) fn warn_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_after - life.mul_f64(NEAR_EXPIRY_SHARE)
    }

    /// Whether `now` is in the last 10% of the lifetime (or past it).
    pub(crate) fn near_expiry(&self, now: SystemTime) -> bool {
        now >= self.warn_at()
    }
}

#[derive(Debug, Default)]
struct State {
    updates: u64,
    write_failures: u64,
    last_update: Option<SystemTime>,
    files: BTreeMap<String, Validity>,
    hook_runs: BTreeMap<(&'static str, &'static str), u64>,
}

/// The helper's counters and the validity of its files.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// A version was written with these files' validity.
    pub(crate) fn written(&self, files: BTreeMap<String, Validity>) {
        self.with(|s| {
            s.updates += 1;
            s.last_update = Some(SystemTime::now());
            s.files = files;
        });
    }

    /// A version could not be written.
    pub(crate) fn write_failed(&self) {
        self.with(|s| s.write_failures += 1);
    }

    /// A hook ran: `hook` is `signal` or `cmd`, `result` `ok`, `failed` or `timeout`.
    pub(crate) fn hook_ran(&self, hook: &'static str, result: &'static str) {
        self.with(|s| *s.hook_runs.entry((hook, result)).or_default() += 1);
    }

    /// Ready: files written, none expired.
    pub(crate) fn ready(&self, now: SystemTime) -> (bool, String) {
        self.with(|s| {
            if s.updates == 0 {
                return (false, "no files written yet".to_owned());
            }
            match s.files.iter().find(|(_, v)| v.not_after <= now) {
                Some((name, _)) => (false, format!("{name} has expired")),
                None => (true, "files written and valid".to_owned()),
            }
        })
    }

    /// The Prometheus text format.
    pub(crate) fn render(&self, now: SystemTime) -> String {
        let (ready, _) = self.ready(now);
        self.with(|s| {
            let mut out = String::new();
            let secs = |t: SystemTime| {
                t.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
            };
            let _ = writeln!(
                out,
                "# HELP spiffed_helper_updates_total Versions of the files written.\n\
                 # TYPE spiffed_helper_updates_total counter\n\
                 spiffed_helper_updates_total {}",
                s.updates
            );
            let _ = writeln!(
                out,
                "# HELP spiffed_helper_write_failures_total Updates that could not be written (the previous files stayed).\n\
                 # TYPE spiffed_helper_write_failures_total counter\n\
                 spiffed_helper_write_failures_total {}",
                s.write_failures
            );
            if let Some(t) = s.last_update {
                let _ = writeln!(
                    out,
                    "# HELP spiffed_helper_last_update_timestamp_seconds When the files were last written.\n\
                     # TYPE spiffed_helper_last_update_timestamp_seconds gauge\n\
                     spiffed_helper_last_update_timestamp_seconds {}",
                    secs(t)
                );
            }
            let _ = writeln!(
                out,
                "# HELP spiffed_helper_file_expiry_timestamp_seconds When the credential in a file expires.\n\
                 # TYPE spiffed_helper_file_expiry_timestamp_seconds gauge"
            );
            for (name, v) in &s.files {
                let _ = writeln!(
                    out,
                    "spiffed_helper_file_expiry_timestamp_seconds{{file=\"{}\"}} {}",
                    escape(name),
                    secs(v.not_after)
                );
            }
            let _ = writeln!(
                out,
                "# HELP spiffed_helper_file_remaining_seconds Seconds until the credential in a file expires (negative once expired).\n\
                 # TYPE spiffed_helper_file_remaining_seconds gauge"
            );
            for (name, v) in &s.files {
                let _ = writeln!(
                    out,
                    "spiffed_helper_file_remaining_seconds{{file=\"{}\"}} {}",
                    escape(name),
                    secs(v.not_after) - secs(now)
                );
            }
            let _ = writeln!(
                out,
                "# HELP spiffed_helper_file_near_expiry 1 when a file is within 10% of its lifetime of expiry (no newer credential arrived).\n\
                 # TYPE spiffed_helper_file_near_expiry gauge"
            );
            for (name, v) in &s.files {
                let _ = writeln!(
                    out,
                    "spiffed_helper_file_near_expiry{{file=\"{}\"}} {}",
                    escape(name),
                    u8::from(v.near_expiry(now))
                );
            }
            let _ = writeln!(
                out,
                "# HELP spiffed_helper_hook_runs_total Runs of the hooks after updates, by hook (signal, cmd) and result (ok, failed, timeout).\n\
                 # TYPE spiffed_helper_hook_runs_total counter"
            );
            for ((hook, result), n) in &s.hook_runs {
                let _ = writeln!(
                    out,
                    "spiffed_helper_hook_runs_total{{hook=\"{hook}\",result=\"{result}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "# HELP spiffed_helper_ready 1 when the files are written and none has expired.\n\
                 # TYPE spiffed_helper_ready gauge\n\
                 spiffed_helper_ready {}",
                u8::from(ready)
            );
            out
        })
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The most connections served at once.
const MAX_CONNECTIONS: usize = 32;
/// The largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` (the error names the setting) and serves in the background.
pub(crate) async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (metrics_listen): {e}"))?;
    if !addr.ip().is_loopback() {
        log::warn(format_args!(
            "metrics_listen {addr} is not a loopback address: anyone who reaches it sees the \
             helper's metrics"
        ));
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(HEAD_TIMEOUT * 3, answer(stream, &metrics)).await;
                drop(permit);
            });
        }
    });
    Ok(())
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read_head = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(buf.get(..n).unwrap_or_default());
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    };
    let complete = tokio::time::timeout(HEAD_TIMEOUT, read_head).await;
    if !matches!(complete, Ok(Ok(true))) {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let now = SystemTime::now();
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(now),
        ),
        ("GET" | "HEAD", "/ready") => {
            let (ready, reason) = metrics.ready(now);
            let body = serde_json::json!({
                "status": if ready { "ready" } else { "not_ready" },
                "reason": reason,
            })
            .to_string();
            (
                if ready {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                "application/json",
                body,
            )
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET or HEAD only\n".to_owned(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_expiry_is_the_last_tenth_of_the_lifetime() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let v = Validity {
            not_before: start,
            not_after: start + Duration::from_secs(100),
        };
        assert!(!v.near_expiry(start + Duration::from_secs(89)));
        assert!(v.near_expiry(start + Duration::from_secs(90)));
        let m = Metrics::default();
        assert!(!m.ready(start).0);
        m.written([("svid.pem".to_owned(), v)].into_iter().collect());
        m.hook_ran("cmd", "timeout");
        let text = m.render(start + Duration::from_secs(95));
        assert!(
            text.contains("spiffed_helper_file_near_expiry{file=\"svid.pem\"} 1"),
            "{text}"
        );
        assert!(text.contains("spiffed_helper_hook_runs_total{hook=\"cmd\",result=\"timeout\"} 1"));
        assert!(text.contains("spiffed_helper_ready 1"));
        assert!(
            m.render(start + Duration::from_secs(50))
                .contains("near_expiry{file=\"svid.pem\"} 0")
        );
        assert!(!m.ready(start + Duration::from_secs(100)).0);
    }
}
