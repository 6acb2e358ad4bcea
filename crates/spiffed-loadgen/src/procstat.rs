//! The agent's resident memory and open descriptors, read from `/proc` (same uid, or root).

use std::fs;

use serde::Serialize;

/// One sample of a process's resource use.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ProcSample {
    /// `VmRSS` from `/proc/PID/status`, in KiB (`None` if unreadable).
    pub rss_kib: Option<u64>,
    /// Entries in `/proc/PID/fd` (`None` if unreadable, e.g. another uid without root).
    pub fds: Option<u64>,
}

impl std::fmt::Display for ProcSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rss_kib {
            Some(kib) => write!(f, "rss={:.1}MiB", kib as f64 / 1024.0)?,
            None => write!(f, "rss=?")?,
        }
        match self.fds {
            Some(n) => write!(f, " fds={n}"),
            None => write!(f, " fds=?"),
        }
    }
}

/// Reads the RSS and the descriptor count of `pid`.
pub fn sample(pid: u32) -> ProcSample {
    ProcSample {
        rss_kib: rss_kib(pid),
        fds: fd_count(pid),
    }
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&status)
}

/// The `VmRSS:` value (KiB) in a `/proc/PID/status` text.
pub fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// How many descriptors `pid` has open.
pub fn fd_count(pid: u32) -> Option<u64> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.filter(Result::is_ok).count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmrss() {
        let text = "Name:\tspiffed\nVmPeak:\t  100 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vmrss(text), Some(12345));
        assert_eq!(parse_vmrss("Name:\tx\n"), None);
    }

    #[test]
    fn reads_own_process() {
        let s = sample(std::process::id());
        assert!(s.rss_kib.unwrap() > 0);
        assert!(s.fds.unwrap() > 0);
    }
}
