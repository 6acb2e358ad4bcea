//! spiffed: a SPIFFE Workload API agent for Linux.
//!
//! The binary wires the agent library to a command line: `run` and `dev` serve the Workload
//! API; `api`, `healthcheck` are clients for people and scripts.
#![forbid(unsafe_code)]

mod admin_cli;
mod cli_common;
mod client;
mod docs_gen;
mod helper;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use cli_common::EX_USAGE;
use cli_common::output::{self, OutputFormat};

/// spiffed gives every process on this host a SPIFFE identity, attested from kernel facts,
/// over the standard SPIFFE Workload API.
#[derive(Parser, Debug)]
#[command(name = "spiffed", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent with a configuration file.
    Run {
        /// The TOML configuration file (see the README for every key) [default:
        /// /etc/spiffed/spiffed.toml, the Debian package's].
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Accept a new trust root: create a new CA when the data dir held one before that can
        /// no longer sign (ca.json deleted, emptied, retired or expired). Workloads and peers
        /// must then fetch the new bundle. Without it, start-up refuses and says why.
        #[arg(long)]
        new_trust_root: bool,
        /// Start with an empty entry store although data_dir holds a CA and its entries.sqlite
        /// is missing or empty (without it, the agent refuses to start: stored entries are lost).
        #[arg(long)]
        new_entry_store: bool,
        /// Agent mode: the join token for node attestation to the SPIRE Server (from
        /// `spire-server token generate`), used instead of join_token in the spire_server
        /// table. Needed only for the first start: the agent keeps its SVID in data_dir and
        /// renews it.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "SPIFFED_JOIN_TOKEN",
            hide_env_values = true
        )]
        join_token: Option<String>,
        /// Check the configuration file and exit, without starting the agent (no socket, no
        /// data_dir, no server contacted): print every problem in it, in file order, and exit
        /// 64; or a summary of what it configures, and exit 0. The files it names are not
        /// read. A TOML syntax error ends the check at that error.
        #[arg(long)]
        check: bool,
    },
    /// Run the agent with no configuration: an embedded CA for trust domain dev.local, an
    /// owner-only socket, and a synthetic identity spiffe://dev.local/uid-UID/EXE_NAME for every
    /// caller. Prints the SPIFFE_ENDPOINT_SOCKET line to export.
    Dev(serve::DevArgs),
    /// Talk to a Workload API socket: fetch, watch and validate SVIDs and bundles.
    Api {
        #[command(flatten)]
        endpoint: client::EndpointArgs,
        #[command(subcommand)]
        command: client::ApiCommand,
    },
    /// Manage registration entries over the admin socket.
    Entry {
        #[command(flatten)]
        admin: admin_cli::AdminArgs,
        #[command(subcommand)]
        command: admin_cli::EntryCommand,
    },
    /// Trust bundles over the admin socket: show this agent's own, and list, set or delete
    /// federated bundles (other trust domains' bundles that workloads receive).
    Bundle {
        #[command(flatten)]
        admin: admin_cli::AdminArgs,
        #[command(subcommand)]
        command: admin_cli::BundleCommand,
    },
    /// Why does a process get, or not get, an identity? Shows the selectors the agent derives
    /// for it, every entry that matches or nearly matches, and the identities it would issue.
    Explain {
        #[command(flatten)]
        admin: admin_cli::AdminArgs,
        #[command(flatten)]
        explain: admin_cli::ExplainArgs,
    },
    /// The agent at a glance, over the admin socket: version, uptime, mode, trust domain, CA
    /// (or agent SVID) validity, entries, SVIDs, open connections and streams, last rotation,
    /// readiness.
    Status {
        #[command(flatten)]
        admin: admin_cli::AdminArgs,
    },
    /// Keep certificate, key, bundle and JWT files up to date for programs that cannot speak
    /// the Workload API (spiffe-helper's job).
    ///
    /// The identity is chosen by SPIFFE ID or hint, never by position; every update is switched
    /// in at once (cert_dir/..data -> the newest version, the names are links into it); then a
    /// signal goes to the pid in a file, or a command runs, beside the helper: a slow or hung
    /// one never holds up the next update. --once writes the files once and exits (init
    /// containers, ExecStartPre). Every option may be set in the --config file instead.
    Helper(Box<helper::HelperArgs>),
    /// Exit 0 when an agent serves on the socket, 1 otherwise.
    Healthcheck {
        #[command(flatten)]
        endpoint: client::EndpointArgs,
    },
    /// Write a shell completion script to standard output, e.g. `spiffed completions bash >
    /// /etc/bash_completion.d/spiffed` (the Debian package installs bash, zsh and fish ones).
    Completions(docs_gen::CompletionsArgs),
    /// Write the man page (roff) to standard output, or every command's page into --dir.
    #[command(hide = true)]
    Man(docs_gen::ManArgs),
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; a bad command line is a usage error (64).
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if output::args_want_json(&args) {
                let rendered = e.to_string();
                let message = rendered.trim();
                let message = message.strip_prefix("error: ").unwrap_or(message);
                output::err_json(&output::error_json(message, "usage", EX_USAGE));
            } else {
                let _ = e.print();
            }
            return ExitCode::from(EX_USAGE);
        }
    };
    // Under --output json, errors are JSON lines on standard error too.
    let json = match &cli.command {
        Command::Api { endpoint, .. } | Command::Healthcheck { endpoint } => {
            endpoint.output == OutputFormat::Json
        }
        Command::Entry { admin, .. }
        | Command::Bundle { admin, .. }
        | Command::Explain { admin, .. }
        | Command::Status { admin } => admin.output == OutputFormat::Json,
        Command::Run { .. }
        | Command::Dev(_)
        | Command::Helper(_)
        | Command::Completions(_)
        | Command::Man(_) => false,
    };
    output::set_json_errors(json);
    // Generated documentation needs no runtime.
    match &cli.command {
        Command::Completions(args) => return docs_gen::completions(Cli::command(), args),
        Command::Man(args) => {
            return docs_gen::man(Cli::command(), args).unwrap_or_else(|e| {
                serve::fatal(&format!("{e:#}"));
                ExitCode::FAILURE
            });
        }
        _ => {}
    }
    // `run` reads its configuration before the runtime starts: worker_threads sizes it.
    let mut prepared = None;
    if let Command::Run {
        config,
        new_trust_root,
        new_entry_store,
        join_token,
        check: false,
    } = &mut cli.command
    {
        match serve::prepare_run(
            config.take(),
            *new_trust_root,
            *new_entry_store,
            join_token.take(),
        ) {
            Ok(p) => prepared = Some(p),
            Err(code) => return code,
        }
    }
    let workers = prepared.as_ref().map_or(
        spiffed_agent::config::DEFAULT_WORKER_THREADS,
        serve::RunConfig::worker_threads,
    );
    // One thread: tokio's current-thread scheduler, on this thread. It runs tasks in the order
    // they were woken. The multi-thread scheduler runs the task woken last first (its LIFO
    // slot) and holds only 256 in a worker's own queue: when a rotation woke 10,000 SDS
    // streams, most waited in the shared queue while each client's acknowledgement of an
    // early push jumped ahead of them, so the last pushes waited for the first ones' ACKs
    // (bench/ab.sh, paired: SDS spread 265 -> 203 ms, median of 6; bench/ANALYSIS.md). The
    // helper keeps the multi-thread scheduler: there it builds PKCS#12 files in place
    // (`block_in_place`); on the current-thread one it would build them inline (helper.rs
    // looks at the flavor), and its stream, timers and signals would wait for the KDF.
    let mut builder = if workers == 1 && !matches!(cli.command, Command::Helper(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            serve::fatal(&format!(
                "cannot start the async runtime ({workers} worker thread(s), worker_threads): {e}"
            ));
            return ExitCode::FAILURE;
        }
    };
    // The command runs as a task, not inside `block_on`: with several workers, the accept
    // loop then spawns each connection's task on the worker it runs on (tokio's LIFO slot),
    // instead of handing every new connection across threads (a futex wake and a context
    // switch per connection).
    let task = runtime.spawn(async move {
        let result = match (cli.command, prepared) {
            (_, Some(prepared)) => serve::run(prepared).await,
            // A `run` without a prepared configuration is `run --check`.
            (Command::Run { config, .. }, None) => Ok(serve::check(config)),
            (Command::Dev(args), None) => serve::dev(args).await,
            (Command::Api { endpoint, command }, None) => client::run_api(&endpoint, command).await,
            (Command::Helper(args), None) => helper::run(*args).await,
            (Command::Healthcheck { endpoint }, None) => client::run_healthcheck(&endpoint).await,
            (Command::Entry { admin, command }, None) => {
                admin_cli::run_entry(&admin, command).await
            }
            (Command::Bundle { admin, command }, None) => {
                admin_cli::run_bundle(&admin, command).await
            }
            (Command::Explain { admin, explain }, None) => {
                admin_cli::run_explain(&admin, &explain).await
            }
            (Command::Status { admin }, None) => admin_cli::run_status(&admin).await,
            // Answered above, before the runtime started.
            (Command::Completions(_) | Command::Man(_), None) => Ok(ExitCode::SUCCESS),
        };
        match result {
            Ok(code) => code,
            Err(e) => {
                serve::fatal(&format!("{e:#}"));
                ExitCode::FAILURE
            }
        }
    });
    runtime.block_on(task).unwrap_or_else(|e| {
        serve::fatal(&format!("the command's task failed: {e}"));
        ExitCode::FAILURE
    })
}
