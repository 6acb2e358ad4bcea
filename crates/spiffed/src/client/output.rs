//! Writing to standard output and standard error without panicking.
//!
//! `println!` panics (exit 101) when standard output is a closed pipe
//! (`spiffed api fetch x509 | head -c1`) or a full disk (`> /dev/full`). Every client command
//! writes through [`out`] instead, which returns the error, and [`StdoutError`] decides how the
//! process ends:
//! - a closed pipe (`EPIPE`): quietly, with exit status 141 (128 + SIGPIPE, what a shell shows
//!   for a tool killed by SIGPIPE, so `set -o pipefail` scripts see the usual status);
//! - any other error (`ENOSPC`, `EIO`...): `spiffed: cannot write to stdout: No space left on
//!   device` on standard error and exit status 74 (`EX_IOERR`).
//!
//! Messages for people go to standard error through [`err`], which never fails: when standard
//! error itself cannot be written, there is nobody left to tell.

use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;

/// Exit status after standard output was closed by its reader (128 + SIGPIPE).
pub(crate) const EXIT_BROKEN_PIPE: u8 = 141;
/// Exit status after standard output failed otherwise (sysexits `EX_IOERR`).
pub(crate) const EX_IOERR: u8 = 74;

/// Standard output could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to stdout: {}", os_message(.0))]
pub(crate) struct StdoutError(#[source] pub(crate) std::io::Error);

impl StdoutError {
    /// Whether the reader went away (`EPIPE`): not worth a message.
    pub(crate) fn is_broken_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }

    /// 141 for a closed pipe, 74 otherwise.
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(if self.is_broken_pipe() {
            EXIT_BROKEN_PIPE
        } else {
            EX_IOERR
        })
    }
}

/// The OS message of `e` without Rust's " (os error N)" suffix.
fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// Writes `text` and a newline to standard output, and flushes.
pub(crate) fn out(text: impl fmt::Display) -> Result<(), StdoutError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(StdoutError)
}

/// Writes `text` and a newline to standard error, ignoring failures.
pub(crate) fn err(text: impl fmt::Display) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_codes() {
        let full = StdoutError(std::io::Error::from_raw_os_error(28));
        assert_eq!(
            full.to_string(),
            "cannot write to stdout: No space left on device"
        );
        assert!(!full.is_broken_pipe());
        assert_eq!(full.exit_code(), ExitCode::from(EX_IOERR));
        let pipe = StdoutError(std::io::Error::from_raw_os_error(32));
        assert!(pipe.is_broken_pipe());
        assert_eq!(pipe.exit_code(), ExitCode::from(EXIT_BROKEN_PIPE));
    }
}
