//! The agent's resident memory, open descriptors and CPU time, read from `/proc` (same uid, or
//! root).

use std::fs;
use std::sync::OnceLock;

use serde::Serialize;

/// One sample of a process's resource use.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ProcSample {
    /// `VmRSS` from `/proc/PID/status`, in KiB (`None` if unreadable).
    pub rss_kib: Option<u64>,
    /// Entries in `/proc/PID/fd` (`None` if unreadable, e.g. another uid without root).
    pub fds: Option<u64>,
    /// User plus system CPU time so far (`utime + stime` of `/proc/PID/stat`), in
    /// milliseconds; the kernel counts it in clock ticks (usually 10 ms each).
    pub cpu_ms: Option<u64>,
    /// CPU time of the live threads so far (sum of `/proc/PID/task/*/schedstat`), in
    /// nanoseconds: precise, but threads that have exited no longer count (see [`cpu_delta_ms`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sched_ns: Option<u64>,
}

/// The CPU time (ms) a process used between samples `a` and `b`: from the threads' `schedstat`
/// (nanoseconds) when both have it and it agrees with `/proc/PID/stat` to within two clock ticks
/// (a thread that exited in between would make it too small), else from `/proc/PID/stat`.
pub fn cpu_delta_ms(a: &ProcSample, b: &ProcSample) -> Option<f64> {
    let coarse = b.cpu_ms?.checked_sub(a.cpu_ms?)? as f64;
    let tick_ms = 1000.0 / clock_ticks_per_second() as f64;
    match (a.sched_ns, b.sched_ns) {
        (Some(x), Some(y)) if y >= x => {
            let fine = (y - x) as f64 / 1e6;
            if (fine - coarse).abs() <= 2.0 * tick_ms {
                Some(fine)
            } else {
                Some(coarse)
            }
        }
        _ => Some(coarse),
    }
}

impl std::fmt::Display for ProcSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rss_kib {
            Some(kib) => write!(f, "rss={:.1}MiB", kib as f64 / 1024.0)?,
            None => write!(f, "rss=?")?,
        }
        match self.fds {
            Some(n) => write!(f, " fds={n}")?,
            None => write!(f, " fds=?")?,
        }
        match self.cpu_ms {
            Some(ms) => write!(f, " cpu={:.2}s", ms as f64 / 1000.0),
            None => write!(f, " cpu=?"),
        }
    }
}

/// Reads the RSS, the descriptor count and the CPU time of `pid`.
pub fn sample(pid: u32) -> ProcSample {
    ProcSample {
        rss_kib: rss_kib(pid),
        fds: fd_count(pid),
        cpu_ms: cpu_ms(pid),
        sched_ns: sched_ns(pid),
    }
}

/// The sum over the live threads of `pid` of the first field of `/proc/PID/task/TID/schedstat`
/// (time on a CPU, ns); `None` if the kernel has no schedstat or the process is unreadable.
pub fn sched_ns(pid: u32) -> Option<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(text) = fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        {
            total = total.saturating_add(ns);
            any = true;
        }
    }
    any.then_some(total)
}

/// User plus system CPU time of `pid` so far, in milliseconds.
pub fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_cpu_ticks(&stat)?;
    Some(ticks.saturating_mul(1000) / clock_ticks_per_second())
}

/// `utime + stime` (fields 14 and 15, in clock ticks) of a `/proc/PID/stat` line. The command
/// name (field 2) is in parentheses and may hold spaces and parentheses itself, so fields are
/// counted after the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; utime is field 14, stime field 15.
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The kernel's clock ticks per second for `/proc` CPU times (`AT_CLKTCK` from
/// `/proc/self/auxv`; 100 if it cannot be read, the value on every Linux architecture today).
pub fn clock_ticks_per_second() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        fs::read("/proc/self/auxv")
            .ok()
            .and_then(|auxv| parse_auxv_clktck(&auxv))
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// `AT_CLKTCK` (type 17) in an auxiliary vector of native-endian `u64` (type, value) pairs.
fn parse_auxv_clktck(auxv: &[u8]) -> Option<u64> {
    const AT_NULL: u64 = 0;
    const AT_CLKTCK: u64 = 17;
    let word = |b: &[u8]| b.try_into().ok().map(u64::from_ne_bytes);
    for pair in auxv.chunks_exact(16) {
        let (kind, value) = (word(&pair[..8])?, word(&pair[8..])?);
        match kind {
            AT_NULL => return None,
            AT_CLKTCK => return Some(value),
            _ => {}
        }
    }
    None
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
        assert!(s.cpu_ms.is_some());
    }

    #[test]
    fn cpu_delta_prefers_schedstat_when_it_agrees() {
        let s = |cpu_ms, sched_ns| ProcSample {
            rss_kib: None,
            fds: None,
            cpu_ms: Some(cpu_ms),
            sched_ns,
        };
        // 23.4 ms by schedstat, 20 ms by ticks: the precise figure.
        let d = cpu_delta_ms(&s(100, Some(1_000_000_000)), &s(120, Some(1_023_400_000)));
        assert!((d.unwrap() - 23.4).abs() < 1e-9);
        // A thread exited: schedstat lost 500 ms, so the ticks count.
        let d = cpu_delta_ms(&s(100, Some(1_000_000_000)), &s(160, Some(560_000_000)));
        assert_eq!(d, Some(60.0));
        let d = cpu_delta_ms(&s(100, Some(1_000_000_000)), &s(900, Some(1_010_000_000)));
        assert_eq!(d, Some(800.0));
        // No schedstat.
        assert_eq!(cpu_delta_ms(&s(100, None), &s(130, None)), Some(30.0));
    }

    #[test]
    fn parses_cpu_ticks_after_the_command_name() {
        // A name with a space and a parenthesis; utime 1234, stime 56.
        let stat = "4242 (a) b) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 4 0 99 \
                    1000 200 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(1290));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let me = std::process::id();
        let (before, sched_before) = (cpu_ms(me).unwrap(), sched_ns(me));
        // Spin until the kernel has counted some CPU time (bounded, for a stuck machine).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_ms(me).unwrap() <= before && start.elapsed() < std::time::Duration::from_secs(30)
        {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let after = cpu_ms(me).unwrap();
        assert!(after > before, "{before} -> {after}");
        if let (Some(a), Some(b)) = (sched_before, sched_ns(me)) {
            assert!(b > a, "{a} -> {b}");
        }
    }

    #[test]
    fn finds_clktck_in_auxv() {
        let mut auxv = Vec::new();
        for (k, v) in [(6u64, 4096u64), (17, 250), (0, 0)] {
            auxv.extend_from_slice(&k.to_ne_bytes());
            auxv.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_auxv_clktck(&auxv), Some(250));
        assert_eq!(parse_auxv_clktck(&auxv[..16]), None);
        assert!(clock_ticks_per_second() > 0);
    }
}
