//! systemd's notification protocol (`sd_notify(3)`), by hand: one datagram per message on the
//! unix socket named by `NOTIFY_SOCKET` (a path, or an abstract socket when it starts with
//! `@`). Under `Type=notify` the agent sends `READY=1` once the Workload API socket serves,
//! `WATCHDOG=1` every half `WATCHDOG_USEC` while its runtime is alive (when systemd asked for
//! it: `WatchdogSec=`), and `STOPPING=1` at shutdown.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio::sync::watch;

/// Where notifications go.
#[derive(Debug)]
pub(crate) struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// For log lines.
    name: String,
}

/// The address `NOTIFY_SOCKET` names: `@name` is an abstract socket, anything else a path.
fn address(value: &str) -> io::Result<SocketAddr> {
    if let Some(name) = value.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(value)
    }
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for, if it is set. A value that cannot be used is
    /// logged and ignored (the agent serves anyway; systemd will report the missing READY).
    pub(crate) fn from_env() -> Option<Self> {
        let value = std::env::var("NOTIFY_SOCKET").ok()?;
        if value.is_empty() {
            return None;
        }
        let opened = address(&value).and_then(|addr| Ok((UnixDatagram::unbound()?, addr)));
        match opened {
            Ok((socket, addr)) => Some(Self {
                socket,
                addr,
                name: value,
            }),
            Err(e) => {
                tracing::warn!(
                    notify_socket = %value,
                    error = %e,
                    "NOTIFY_SOCKET is set but unusable; not notifying systemd"
                );
                None
            }
        }
    }

    /// Sends one notification (`READY=1`, `WATCHDOG=1`, ...); a failure is logged.
    pub(crate) fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::warn!(
                notify_socket = %self.name,
                message,
                error = %e,
                "could not notify systemd"
            );
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set for this process
/// (`WATCHDOG_PID` unset or ours). A bad value is logged and ignored.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim() != std::process::id().to_string()
    {
        return None;
    }
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Some(Duration::from_micros(n) / 2),
        _ => {
            tracing::warn!(
                watchdog_usec = %usec,
                "WATCHDOG_USEC is not a positive number of microseconds; not sending watchdog \
                 keep-alives"
            );
            None
        }
    }
}

/// Sends `WATCHDOG=1` every `every` until `stop` turns true. It runs on the agent's runtime,
/// so a wedged runtime stops the keep-alives and systemd restarts the agent.
pub(crate) async fn watchdog(
    notifier: std::sync::Arc<Notifier>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // The first keep-alive one period after start: READY=1 goes first.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => notifier.send("WATCHDOG=1"),
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_abstract_names_are_addressed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: UnixDatagram::unbound().unwrap(),
            addr: address(path.to_str().unwrap()).unwrap(),
            name: "test".into(),
        };
        n.send("READY=1");
        let mut buf = [0; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("spiffed-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier {
            socket: UnixDatagram::unbound().unwrap(),
            addr: address(&format!("@{name}")).unwrap(),
            name: "test".into(),
        };
        n.send("WATCHDOG=1");
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }
}
