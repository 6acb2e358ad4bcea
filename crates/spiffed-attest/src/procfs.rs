//! Reading the facts about a process out of `/proc/PID`.

use std::fs::File;
use std::io;
use std::path::PathBuf;

/// One file of `/proc/PID`, read whole. Invalid UTF-8 (a cgroup or command name can hold any
/// bytes) is replaced rather than failing the read.
pub(crate) fn read(pid: u32, what: &str) -> io::Result<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/{what}"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The target of `/proc/PID/exe`: the executable's path as the kernel reports it, with
/// " (deleted)" appended when the file has been unlinked since it was executed.
pub(crate) fn exe_path(pid: u32) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
}

/// Opens the file the process is executing, whatever its path now names.
pub(crate) fn open_exe(pid: u32) -> io::Result<File> {
    File::open(format!("/proc/{pid}/exe"))
}

/// `CAP_SYS_PTRACE`, the capability `ptrace_may_access(PTRACE_MODE_READ_FSCREDS)` asks of a
/// process that reads `/proc/PID/exe` of a process with other credentials (or a non-dumpable
/// one). `CAP_DAC_READ_SEARCH` and `CAP_DAC_OVERRIDE` do not help there.
pub(crate) const CAP_SYS_PTRACE: u32 = 19;

/// The effective capability set of this process (`CapEff:` in `/proc/self/status`).
pub(crate) fn own_effective_caps() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&text)
        .ok_or_else(|| io::Error::other("/proc/self/status has no readable CapEff line"))
}

fn parse_cap_eff(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// What attestation uses from `/proc/PID/status`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Status {
    /// The `Groups:` line: supplementary gids.
    pub(crate) groups: Vec<u32>,
    /// `State:` is `Z` (zombie) or `X` (dead): the process has exited.
    pub(crate) exited: bool,
}

impl Status {
    /// Parses the text of `/proc/PID/status`. Unknown lines and unparsable gids are ignored.
    pub(crate) fn parse(text: &str) -> Self {
        let mut status = Self::default();
        for line in text.lines() {
            if let Some(groups) = line.strip_prefix("Groups:") {
                status.groups = groups
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect();
            } else if let Some(state) = line.strip_prefix("State:") {
                status.exited = matches!(state.trim_start().chars().next(), Some('Z' | 'X'));
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_groups_and_state() {
        let text = "Name:\tbash\nState:\tS (sleeping)\nTgid:\t42\nUid:\t1000\t1000\t1000\t1000\n\
                    Gid:\t1000\t1000\t1000\t1000\nFDSize:\t256\nGroups:\t4 24 27 1000 \n";
        assert_eq!(
            Status::parse(text),
            Status {
                groups: vec![4, 24, 27, 1000],
                exited: false,
            }
        );
        let zombie = "Name:\tsleep\nState:\tZ (zombie)\nGroups:\t\n";
        assert_eq!(
            Status::parse(zombie),
            Status {
                groups: vec![],
                exited: true,
            }
        );
    }

    #[test]
    fn parses_the_effective_capabilities() {
        let text = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                    CapEff:\t0000000000080000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(text), Some(1 << CAP_SYS_PTRACE));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert!(own_effective_caps().is_ok());
    }

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        let status = Status::parse(&read(me, "status").unwrap());
        assert!(!status.exited);
        assert_eq!(
            exe_path(me).unwrap(),
            std::env::current_exe().unwrap().canonicalize().unwrap()
        );
        assert!(open_exe(me).is_ok());
    }
}
