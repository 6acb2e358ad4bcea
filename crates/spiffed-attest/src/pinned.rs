//! `/proc/PID` of one caller, read under the pidfd that pins the process that connected: every
//! plugin that reads `/proc` proves afterwards, with [`Pinned::still_the_caller`], that what it
//! read describes the caller.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use spiffed_core::{AttestError, LeftOut, LogGate};

use crate::{procfs, sys};

/// `/proc/PID` of one caller, with the pidfd that pins the process that connected.
pub(crate) struct Pinned<'a> {
    pub(crate) pid: u32,
    /// The caller's uid, for log lines.
    pub(crate) uid: u32,
    pub(crate) pidfd: Option<&'a OwnedFd>,
    /// Gates the log line for files of `/proc/PID` the agent may not read.
    pub(crate) denied_log: &'a LogGate,
}

impl Pinned<'_> {
    /// Reads `/proc/PID/what`; `None` when the agent may not read it (see
    /// [`leave_out`](Self::leave_out)).
    pub(crate) fn read_or_leave_out(
        &self,
        what: &'static str,
        kinds: &[&str],
        left_out: &mut Vec<LeftOut>,
    ) -> Result<Option<String>, AttestError> {
        match procfs::read(self.pid, what) {
            Ok(text) => Ok(Some(text)),
            Err(e) => self.leave_out(what, e, kinds, left_out).map(|()| None),
        }
    }

    /// Opens the file the process runs (`/proc/PID/exe`); `None` when the agent may not (see
    /// [`leave_out`](Self::leave_out)).
    pub(crate) fn open_exe_or_leave_out(
        &self,
        kinds: &[&str],
        left_out: &mut Vec<LeftOut>,
    ) -> Result<Option<File>, AttestError> {
        match procfs::open_exe(self.pid) {
            Ok(file) => Ok(Some(file)),
            Err(e) => self.leave_out("exe", e, kinds, left_out).map(|()| None),
        }
    }

    /// A failed read of `/proc/PID/what`. A refusal (the agent lacks the privilege, see
    /// [`exe_access_warning`](crate::exe_access_warning)) leaves out only the selector types
    /// `kinds` that need the file, so the caller keeps the identities its other selectors earn;
    /// anything else is an error as [`error`](Self::error) says. Whether the process still runs
    /// is checked after every read, as for a successful one.
    pub(crate) fn leave_out(
        &self,
        what: &'static str,
        source: io::Error,
        kinds: &[&str],
        left_out: &mut Vec<LeftOut>,
    ) -> Result<(), AttestError> {
        if !matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
            return Err(self.error(what, source));
        }
        let pid = self.pid;
        let agent_uid = rustix::process::geteuid().as_raw();
        let reason = if what == "exe" {
            format!(
                "the agent (uid {agent_uid}) may not read /proc/{pid}/exe ({source}); reading \
                 the executable of another uid's process needs root or CAP_SYS_PTRACE"
            )
        } else {
            format!(
                "the agent (uid {agent_uid}) may not read /proc/{pid}/{what} ({source}); with \
                 /proc mounted hidepid, run the agent as root or in /proc's gid= group"
            )
        };
        self.log_left_out(kinds, &reason);
        push_left_out(left_out, kinds, &reason);
        Ok(())
    }

    /// Logs (at most once per interval of [`denied_log`](Self::denied_log)) that `kinds` are
    /// left out for this caller and why.
    pub(crate) fn log_left_out(&self, kinds: &[&str], reason: &str) {
        if let Some(held_back) = self.denied_log.admit(Instant::now()) {
            tracing::info!(
                pid = self.pid,
                uid = self.uid,
                left_out = %kinds.join(", "),
                %reason,
                held_back,
                "selectors left out: entries that need them do not match this caller \
                 (held_back: similar lines not logged since the last one)"
            );
        }
    }

    /// A failed read of `/proc/PID/what`: the process is gone, or `/proc` failed us.
    ///
    /// A file that every live user process has being missing means the process is gone or going:
    /// an exiting process loses `/proc/PID/exe` when it drops its memory, before its pidfd
    /// reports the exit.
    pub(crate) fn error(&self, what: &'static str, source: io::Error) -> AttestError {
        let pid = self.pid;
        let vanished =
            source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH);
        let gone = vanished
            || self
                .pidfd
                .is_some_and(|fd| !sys::pidfd_is_running(fd.as_fd(), pid));
        if gone {
            AttestError::ProcessGone { pid }
        } else {
            AttestError::Proc { pid, what, source }
        }
    }

    /// Checks that the connecting process has not exited (no `/proc` facts to tie to it).
    pub(crate) fn still_running(&self) -> Result<(), AttestError> {
        match self.pidfd {
            Some(fd) if sys::pidfd_exited(fd.as_fd()) => {
                Err(AttestError::ProcessGone { pid: self.pid })
            }
            _ => Ok(()),
        }
    }

    /// Checks, after `/proc/PID` was read, that the connecting process still runs as PID.
    pub(crate) fn still_the_caller(&self) -> Result<(), AttestError> {
        let pid = self.pid;
        match self.pidfd {
            Some(fd) if sys::pidfd_is_running(fd.as_fd(), pid) => Ok(()),
            Some(_) => Err(AttestError::ProcessGone { pid }),
            None => {
                tracing::debug!(
                    pid,
                    "no pidfd for this connection; cannot prove /proc/PID is the caller"
                );
                Ok(())
            }
        }
    }
}

/// Records that each of `kinds` was left out for `reason`.
pub(crate) fn push_left_out(left_out: &mut Vec<LeftOut>, kinds: &[&str], reason: &str) {
    left_out.extend(kinds.iter().map(|&kind_key| LeftOut {
        kind_key: kind_key.to_owned(),
        reason: reason.to_owned(),
    }));
}
