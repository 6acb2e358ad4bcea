//! Shell completions and man pages, generated from the clap definitions so that they never
//! drift from the command line: `spiffed completions SHELL` (public) and `spiffed man [--dir
//! DIR]` (hidden; `packaging/build-deb.sh` runs both for the Debian package).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Command};
use clap_complete::Shell;

use crate::cli_common::output::StdoutError;

/// `spiffed completions SHELL`.
#[derive(Args, Debug)]
pub(crate) struct CompletionsArgs {
    /// The shell to write the completion script for.
    #[arg(value_enum)]
    shell: Shell,
}

/// `spiffed man [--dir DIR]`.
#[derive(Args, Debug)]
pub(crate) struct ManArgs {
    /// Write one page per command into DIR (spiffed.1, spiffed-run.1, spiffed-entry-create.1,
    /// ...) instead of spiffed.1 to standard output.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Writes the completion script for `args.shell` to standard output.
pub(crate) fn completions(mut cmd: Command, args: &CompletionsArgs) -> ExitCode {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "spiffed", &mut script);
    write_stdout(&script)
}

/// Writes the man page of `spiffed` to standard output, or every command's page into a
/// directory (each file atomically: a temp file in the directory renamed over the page).
pub(crate) fn man(cmd: Command, args: &ManArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = &args.dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut page)
            .context("cannot render the man page")?;
        return Ok(write_stdout(&page));
    };
    let mut written = 0;
    write_pages(&cmd, dir, &mut written)?;
    crate::cli_common::output::err(format!(
        "spiffed: wrote {written} man pages to {}",
        dir.display()
    ));
    Ok(ExitCode::SUCCESS)
}

/// Writes the page of `cmd` and of each of its visible subcommands, recursively.
fn write_pages(cmd: &Command, dir: &Path, written: &mut usize) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render(&mut page)
        .with_context(|| format!("cannot render the man page of {}", cmd.get_name()))?;
    let target = dir.join(man.get_filename());
    let mut tmp = tempfile::Builder::new()
        .prefix(".spiffed-man-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    tmp.write_all(&page)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    // Pages are read by everyone; the temp file was created 0600.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .with_context(|| format!("cannot chmod {}", tmp.path().display()))?;
    tmp.persist(&target)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot rename a temp file over {}", target.display()))?;
    *written += 1;
    Ok(())
}

/// Writes `bytes` to standard output: 0, or 141/74 as the other commands exit when it fails.
fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = StdoutError(e);
            if !e.is_broken_pipe() {
                crate::cli_common::output::err(format!("spiffed: {e}"));
            }
            e.exit_code()
        }
    }
}
