//! Writing to standard output and standard error without panicking, in the format the user
//! chose with `--output`.
//!
//! `println!` panics (exit 101) when standard output is a closed pipe
//! (`spiffed api fetch x509 | head -c1`) or a full disk (`> /dev/full`). Every client and admin
//! command writes through [`out`] instead, which returns the error, and [`StdoutError`] decides how the
//! process ends:
//! - a closed pipe (`EPIPE`): quietly, with exit status 141 (128 + SIGPIPE, what a shell shows
//!   for a tool killed by SIGPIPE, so `set -o pipefail` scripts see the usual status);
//! - any other error (`ENOSPC`, `EIO`...): `spiffed: cannot write to stdout: No space left on
//!   device` on standard error and exit status 74 (`EX_IOERR`).
//!
//! Messages for people go to standard error through [`err`], which never fails: when standard
//! error itself cannot be written, there is nobody left to tell.
//!
//! [`OutputFormat`] is the `--output` choice of every client and admin command: readable text,
//! or JSON on one line for scripts; [`print()`] writes a result in it.

use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

use super::{EX_IOERR, EXIT_BROKEN_PIPE};

/// How a command prints its results: `--output text|json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutputFormat {
    /// Readable text.
    Text,
    /// JSON: one value on one line (`api watch`: one per line, per update).
    Json,
}

/// The `--output` value parser, with the help each group of commands gives the two values
/// (`json` means one object for `api fetch`, but an array for `entry list`).
pub(crate) fn output_format_parser(
    text_help: &'static str,
    json_help: &'static str,
) -> impl TypedValueParser<Value = OutputFormat> {
    PossibleValuesParser::new([
        PossibleValue::new("text").help(text_help),
        PossibleValue::new("json").help(json_help),
    ])
    .map(|value| {
        if value == "json" {
            OutputFormat::Json
        } else {
            OutputFormat::Text
        }
    })
}

/// Prints `text`, or `json` on one line, as `format` says.
pub(crate) fn print(
    format: OutputFormat,
    text: &str,
    json: &serde_json::Value,
) -> Result<(), StdoutError> {
    out(render(format, text, json))
}

/// What [`print()`] writes, without its newline.
fn render<'a>(
    format: OutputFormat,
    text: &'a str,
    json: &serde_json::Value,
) -> std::borrow::Cow<'a, str> {
    match format {
        OutputFormat::Text => text.into(),
        // `Value`'s `Display` is compact JSON: one line, whatever the strings hold.
        OutputFormat::Json => json.to_string().into(),
    }
}

/// Whether errors are printed as JSON lines (the command was given `--output json`).
static JSON_ERRORS: AtomicBool = AtomicBool::new(false);

/// Makes every error of this process a JSON line on standard error (`--output json`), so that a
/// script reads one format on both streams.
pub(crate) fn set_json_errors(on: bool) {
    JSON_ERRORS.store(on, Ordering::Relaxed);
}

/// Whether errors are printed as JSON lines.
pub(crate) fn json_errors() -> bool {
    JSON_ERRORS.load(Ordering::Relaxed)
}

/// The JSON form of an error: `{"error":"...","kind":"...","exit_code":N}`, on one line.
pub(crate) fn error_json(message: &str, kind: &str, exit_code: u8) -> serde_json::Value {
    serde_json::json!({"error": message, "kind": kind, "exit_code": exit_code})
}

/// Whether a raw command line asks for `--output json` (looked at before parsing, for the
/// errors of parsing itself).
pub(crate) fn args_want_json<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> bool {
    let mut previous_was_output = false;
    for arg in args {
        let arg = arg.as_ref();
        if arg == "--" {
            return false;
        }
        if (previous_was_output && arg == "json") || arg == "--output=json" {
            return true;
        }
        previous_was_output = arg == "--output";
    }
    false
}

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
    pub(crate) fn exit_status(&self) -> u8 {
        if self.is_broken_pipe() {
            EXIT_BROKEN_PIPE
        } else {
            EX_IOERR
        }
    }

    /// [`StdoutError::exit_status`] as the process's exit code.
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_status())
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

/// Writes `text` and a newline to standard error, ignoring failures. Under `--output json`
/// ([`set_json_errors`]) the line is JSON instead: `{"message":"...","kind":"message"}`, the
/// text without its `spiffed: ` prefix, so that standard error holds JSON lines only.
pub(crate) fn err(text: impl fmt::Display) {
    if json_errors() {
        let text = text.to_string();
        let message = text.strip_prefix("spiffed: ").unwrap_or(&text);
        err_json(&serde_json::json!({"message": message, "kind": "message"}));
    } else {
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "{text}");
    }
}

/// Writes `json` on one line to standard error, ignoring failures.
pub(crate) fn err_json(json: &serde_json::Value) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{json}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_asked_for_before_parsing() {
        assert!(args_want_json(&[
            "spiffed", "api", "fetch", "x509", "--output", "json"
        ]));
        assert!(args_want_json(&[
            "spiffed",
            "entry",
            "list",
            "--output=json"
        ]));
        assert!(!args_want_json(&["spiffed", "api", "fetch", "x509"]));
        assert!(!args_want_json(&[
            "spiffed", "api", "--output", "text", "json"
        ]));
        assert!(!args_want_json(&[
            "spiffed",
            "api",
            "validate",
            "jwt",
            "--",
            "--output=json"
        ]));
    }

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

    /// A command with one `--output` argument, as the client and admin commands declare it.
    fn command() -> clap::Command {
        clap::Command::new("t").arg(
            clap::Arg::new("output")
                .long("output")
                .default_value("text")
                .value_parser(output_format_parser("Text help", "JSON help")),
        )
    }

    fn parse(args: &[&str]) -> Result<OutputFormat, clap::Error> {
        let matches =
            command().try_get_matches_from(std::iter::once("t").chain(args.iter().copied()))?;
        Ok(*matches.get_one::<OutputFormat>("output").unwrap())
    }

    #[test]
    fn output_takes_text_or_json_and_defaults_to_text() {
        assert_eq!(parse(&[]).unwrap(), OutputFormat::Text);
        assert_eq!(parse(&["--output", "text"]).unwrap(), OutputFormat::Text);
        assert_eq!(parse(&["--output", "json"]).unwrap(), OutputFormat::Json);
        assert_eq!(parse(&["--output=json"]).unwrap(), OutputFormat::Json);
        for bad in ["yaml", "JSON", ""] {
            let e = parse(&["--output", bad]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue, "{bad:?}");
            assert!(
                e.to_string().contains("[possible values: text, json]"),
                "{e}"
            );
        }
    }

    #[test]
    fn each_command_group_keeps_its_own_help_for_the_values() {
        let help = command().render_long_help().to_string();
        assert!(help.contains("- text: Text help"), "{help}");
        assert!(help.contains("- json: JSON help"), "{help}");
    }

    #[test]
    fn json_is_rendered_on_one_line_and_text_as_given() {
        let json = serde_json::json!({"entries": [{"id": "a\nb"}], "n": 2});
        let text = "line one\nline two";
        assert_eq!(render(OutputFormat::Text, text, &json), text);
        let rendered = render(OutputFormat::Json, text, &json);
        assert!(!rendered.contains('\n'), "{rendered}");
        assert_eq!(rendered, r#"{"entries":[{"id":"a\nb"}],"n":2}"#);
        let back: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(back, json);
    }
}
