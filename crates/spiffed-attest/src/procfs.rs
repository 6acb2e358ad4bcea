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
