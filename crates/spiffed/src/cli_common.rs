//! What the client commands (`spiffed api ...`, `spiffed healthcheck`) and the admin commands
//! (`spiffed entry ...`, `spiffed explain`) share: the errors of reaching a socket
//! ([`socket`]), writing results in the `--output` format ([`output`]), and how a failed
//! command is reported and which exit status it ends with ([`Failure`], [`fail`]).
//!
//! Exit statuses: 0 on success, 1 for a failure (the agent refused, the socket cannot be
//! reached, a batch failed), 64 for a bad command line or configuration, 74 when standard
//! output cannot be written, 141 when its reader went away.

pub(crate) mod output;
pub(crate) mod socket;

use std::process::ExitCode;

/// Exit status for a usage or configuration error (sysexits `EX_USAGE`).
pub(crate) const EX_USAGE: u8 = 64;
/// Exit status after standard output failed, other than a closed pipe (sysexits `EX_IOERR`).
pub(crate) const EX_IOERR: u8 = 74;
/// Exit status after standard output was closed by its reader (128 + SIGPIPE).
pub(crate) const EXIT_BROKEN_PIPE: u8 = 141;

/// An error that ends a client or admin command.
pub(crate) trait Failure: std::fmt::Display {
    /// Whether the command line (or a file it names) is wrong: exit status 64.
    fn is_usage(&self) -> bool {
        false
    }

    /// The failure to write standard output this is, if it is one.
    fn stdout_error(&self) -> Option<&output::StdoutError> {
        None
    }

    /// Whether the message is printed without the `error: ` label (an invalid configuration
    /// is printed as `spiffed run` prints it).
    fn unlabelled(&self) -> bool {
        false
    }

    /// The exit status: 141 or 74 for standard output, 64 for usage, 1 otherwise.
    fn exit_status(&self) -> u8 {
        match self.stdout_error() {
            Some(e) => e.exit_status(),
            None if self.is_usage() => EX_USAGE,
            None => 1,
        }
    }

    /// [`Failure::exit_status`] as the process's exit code.
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_status())
    }
}

impl Failure for socket::SocketError {}

impl Failure for output::StdoutError {
    fn stdout_error(&self) -> Option<&output::StdoutError> {
        Some(self)
    }
}

/// The line [`fail`] prints for `err` on standard error, if any. A closed standard output
/// ends the command quietly, as it does other command-line tools.
fn failure_message(err: &impl Failure) -> Option<String> {
    match err.stdout_error() {
        Some(e) if e.is_broken_pipe() => None,
        Some(e) => Some(format!("spiffed: {e}")),
        None if err.unlabelled() => Some(format!("spiffed: {err}")),
        None => Some(format!("spiffed: error: {err}")),
    }
}

/// The JSON line [`fail`] prints for `err` under `--output json`, if any:
/// `{"error":"...","kind":"usage|stdout|failure","exit_code":N}`.
fn failure_json(err: &impl Failure) -> Option<serde_json::Value> {
    let (kind, message) = match err.stdout_error() {
        Some(e) if e.is_broken_pipe() => return None,
        Some(e) => ("stdout", e.to_string()),
        None if err.is_usage() => ("usage", err.to_string()),
        None => ("failure", err.to_string()),
    };
    Some(output::error_json(&message, kind, err.exit_status()))
}

/// Prints an error the way every spiffed command does (a JSON line under `--output json`) and
/// returns its exit status.
pub(crate) fn fail(err: &impl Failure) -> ExitCode {
    if output::json_errors() {
        if let Some(json) = failure_json(err) {
            output::err_json(&json);
        }
    } else if let Some(message) = failure_message(err) {
        output::err(message);
    }
    err.exit_code()
}

#[cfg(test)]
mod tests {
    use super::output::StdoutError;
    use super::*;

    /// A command error with every trait answer chosen by the test.
    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Scripted {
        message: &'static str,
        usage: bool,
        plain: bool,
        stdout: Option<StdoutError>,
    }

    impl Failure for Scripted {
        fn is_usage(&self) -> bool {
            self.usage
        }
        fn stdout_error(&self) -> Option<&StdoutError> {
            self.stdout.as_ref()
        }
        fn unlabelled(&self) -> bool {
            self.plain
        }
    }

    fn scripted(usage: bool, plain: bool, errno: Option<i32>) -> Scripted {
        Scripted {
            message: "it broke",
            usage,
            plain,
            stdout: errno.map(|e| StdoutError(std::io::Error::from_raw_os_error(e))),
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(scripted(false, false, None).exit_code(), ExitCode::FAILURE);
        assert_eq!(
            scripted(true, false, None).exit_code(),
            ExitCode::from(EX_USAGE)
        );
        // Standard output decides before usage: the message could not be printed at all.
        assert_eq!(
            scripted(true, false, Some(28)).exit_code(),
            ExitCode::from(EX_IOERR)
        );
        assert_eq!(
            scripted(false, false, Some(32)).exit_code(),
            ExitCode::from(EXIT_BROKEN_PIPE)
        );
        let full = StdoutError(std::io::Error::from_raw_os_error(28));
        assert_eq!(full.exit_code(), ExitCode::from(EX_IOERR));
        assert_eq!(fail(&full), ExitCode::from(EX_IOERR));
    }

    #[test]
    fn messages_are_labelled_unless_asked_not_to_and_a_closed_pipe_is_quiet() {
        assert_eq!(
            failure_message(&scripted(false, false, None)).as_deref(),
            Some("spiffed: error: it broke")
        );
        assert_eq!(
            failure_message(&scripted(true, true, None)).as_deref(),
            Some("spiffed: it broke")
        );
        assert_eq!(
            failure_message(&scripted(false, false, Some(28))).as_deref(),
            Some("spiffed: cannot write to stdout: No space left on device")
        );
        assert_eq!(failure_message(&scripted(false, false, Some(32))), None);
    }

    #[test]
    fn json_failures_carry_the_message_kind_and_status() {
        let usage = failure_json(&scripted(true, false, None)).unwrap();
        assert_eq!(
            usage,
            serde_json::json!({"error": "it broke", "kind": "usage", "exit_code": 64})
        );
        let full = failure_json(&scripted(false, false, Some(28))).unwrap();
        assert_eq!(full["kind"], "stdout");
        assert_eq!(full["exit_code"], 74);
        assert_eq!(
            full["error"],
            "cannot write to stdout: No space left on device"
        );
        assert_eq!(
            failure_json(&scripted(false, true, None)).unwrap()["exit_code"],
            1
        );
        assert_eq!(failure_json(&scripted(false, false, Some(32))), None);
    }
}
