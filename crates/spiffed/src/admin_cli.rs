//! The administration commands: `spiffed entry create|list|show|update|delete` and
//! `spiffed explain --pid PID`.
//!
//! They speak spiffed's own admin API (`spiffed.admin.v1.EntryAdmin`) on the privileged admin
//! socket, never the Workload API. The socket is `--admin-socket`, else the
//! `admin_socket_path` of `--config FILE`, else the default
//! ([`DEFAULT_ADMIN_SOCKET_PATH`]); the agent checks callers against its uid and
//! `admin_uids`.
//!
//! Data flow: [`AdminArgs`] resolve to a socket path; [`connect`] opens a gRPC channel over it
//! and turns failures into an [`AdminError`] that says what to do; each command makes its
//! calls and prints through [`render`] (text for people, one JSON value on one line for
//! scripts). [`spec`] builds the entry specs `create` and `update` send.
//!
//! Exit codes: 0 on success, 1 when the agent refuses or any entry of a batch fails, 64 for a
//! bad command line, configuration file or `--from-file`.
mod bundle;
mod render;
mod spec;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde_json::Value;
use spiffed_agent::config::{Config, ConfigError, DEFAULT_ADMIN_SOCKET_PATH};
use spiffed_proto::admin::bundle_admin_client::BundleAdminClient;
use spiffed_proto::admin::entry_admin_client::EntryAdminClient;
use spiffed_proto::admin::{
    CreateEntriesRequest, DeleteEntriesRequest, Entry, EntrySpec, ExplainRequest, GetEntryRequest,
    GetStatusRequest, ListEntriesRequest, UpdateEntryRequest,
};
use tonic::transport::{Channel, Endpoint};

use crate::cli_common::output::{OutputFormat, StdoutError, err, out, output_format_parser, print};
use crate::cli_common::socket::{Api, SocketError, check_socket_file};
use crate::cli_common::{Failure, fail};
use spec::SpecChanges;

pub(crate) use bundle::{BundleCommand, run_bundle};

/// How long to wait for the admin socket to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one admin call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries per `ListEntries` page.
const PAGE_SIZE: u32 = 100;
/// A bound on pages, so a server that never ends a listing cannot loop the CLI forever.
const MAX_PAGES: usize = 100_000;

/// Where the admin socket is and how to print: shared by `spiffed entry ...` and
/// `spiffed explain`.
#[derive(clap::Args, Debug)]
pub(crate) struct AdminArgs {
    /// Admin socket path. Default: admin_socket_path from --config, else
    /// /run/spiffed/private/admin.sock.
    #[arg(long, global = true, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// The agent's TOML configuration file, to find its admin socket (admin_socket_path).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(
        long,
        default_value = "text",
        global = true,
        value_parser = output_format_parser(
            "Readable text and tables",
            "JSON: one value on one line (an object for one entry, an array for lists and \
             batches)",
        )
    )]
    pub(crate) output: OutputFormat,
}

/// `spiffed entry ...`: manage registration entries.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum EntryCommand {
    /// Create an entry (or, with --from-file, many): every process with all of its selectors
    /// gets its SPIFFE ID.
    Create(CreateArgs),
    /// List entries, from the config file and the store.
    List(ListArgs),
    /// Show one entry, every field.
    Show {
        /// The entry's ID (as `entry list` shows it).
        id: String,
    },
    /// Change a stored entry: the fields given are replaced, the others keep their values.
    Update(UpdateArgs),
    /// Delete stored entries.
    Delete {
        /// The IDs of the entries to delete.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
}

/// `spiffed entry create`.
#[derive(clap::Args, Debug)]
pub(crate) struct CreateArgs {
    /// The SPIFFE ID to issue, e.g. spiffe://example.org/web.
    #[arg(
        long,
        value_name = "ID",
        required_unless_present = "from_file",
        conflicts_with = "from_file"
    )]
    spiffe_id: Option<String>,
    /// A selector, TYPE:VALUE (e.g. unix:uid:1000, unix:path:/usr/bin/web). Repeat it: a
    /// process matches when it has all of them.
    #[arg(
        long = "selector",
        value_name = "SELECTOR",
        required_unless_present = "from_file",
        conflicts_with = "from_file"
    )]
    selectors: Vec<String>,
    /// X.509-SVID lifetime, e.g. 10m or 1h. Default: the agent's x509_svid_ttl.
    #[arg(long, value_name = "DURATION", value_parser = spec::parse_ttl, conflicts_with = "from_file")]
    x509_svid_ttl: Option<u64>,
    /// JWT-SVID lifetime, e.g. 5m. Default: the agent's jwt_svid_ttl.
    #[arg(long, value_name = "DURATION", value_parser = spec::parse_ttl, conflicts_with = "from_file")]
    jwt_svid_ttl: Option<u64>,
    /// A hint sent with the SVID, to tell a workload's identities apart (e.g. internal).
    #[arg(long, value_name = "HINT", conflicts_with = "from_file")]
    hint: Option<String>,
    /// A DNS name for the X.509-SVID's SAN. Repeat it for more.
    #[arg(long = "dns-name", value_name = "NAME", conflicts_with = "from_file")]
    dns_names: Vec<String>,
    /// A foreign trust domain (e.g. partner.example) whose federated bundle the entry's
    /// workloads receive (see `spiffed bundle set`). Repeat it for more.
    #[arg(
        long = "federates-with",
        value_name = "TRUST_DOMAIN",
        conflicts_with = "from_file"
    )]
    federates_with: Vec<String>,
    /// Create every entry in FILE (- for stdin): a JSON array of objects with spiffe_id,
    /// selectors and optionally x509_svid_ttl_seconds, jwt_svid_ttl_seconds, hint, dns_names
    /// (the output of `entry list --output json` is accepted). Prints one line per entry.
    #[arg(long, value_name = "FILE")]
    from_file: Option<PathBuf>,
}

/// `spiffed entry list`.
#[derive(clap::Args, Debug)]
pub(crate) struct ListArgs {
    /// Only entries with this SPIFFE ID.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// Only entries that have this selector (e.g. unix:uid:1000).
    #[arg(long, value_name = "SELECTOR")]
    selector: Option<String>,
}

/// `spiffed entry update`.
#[derive(clap::Args, Debug)]
pub(crate) struct UpdateArgs {
    /// The entry's ID.
    id: String,
    /// The revision you expect the entry to be at (as `entry show` prints it). Pass it to
    /// protect against concurrent edits: the update fails if the entry changed since. Without
    /// it, the current revision is used.
    #[arg(long, value_name = "N")]
    revision: Option<u64>,
    /// A new SPIFFE ID.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// A selector, TYPE:VALUE. Repeat it; the selectors given replace all current ones.
    #[arg(long = "selector", value_name = "SELECTOR")]
    selectors: Vec<String>,
    /// X.509-SVID lifetime, e.g. 10m; 0s for the agent default.
    #[arg(long, value_name = "DURATION", value_parser = spec::parse_ttl)]
    x509_svid_ttl: Option<u64>,
    /// JWT-SVID lifetime, e.g. 5m; 0s for the agent default.
    #[arg(long, value_name = "DURATION", value_parser = spec::parse_ttl)]
    jwt_svid_ttl: Option<u64>,
    /// A new hint; "" removes it.
    #[arg(long, value_name = "HINT")]
    hint: Option<String>,
    /// A DNS name for the X.509-SVID's SAN. Repeat it; the names given replace all current
    /// ones.
    #[arg(
        long = "dns-name",
        value_name = "NAME",
        conflicts_with = "clear_dns_names"
    )]
    dns_names: Vec<String>,
    /// Remove all DNS names.
    #[arg(long)]
    clear_dns_names: bool,
    /// A foreign trust domain whose federated bundle the entry's workloads receive. Repeat it;
    /// the trust domains given replace all current ones.
    #[arg(
        long = "federates-with",
        value_name = "TRUST_DOMAIN",
        conflicts_with = "clear_federates_with"
    )]
    federates_with: Vec<String>,
    /// Federate with no trust domain any more.
    #[arg(long)]
    clear_federates_with: bool,
}

/// `spiffed explain`.
#[derive(clap::Args, Debug)]
pub(crate) struct ExplainArgs {
    /// The process to explain: the selectors the agent derives for it, each entry that matches
    /// or nearly does, and the identities it would get.
    #[arg(long)]
    pid: u32,
}

/// Why an admin command failed. Each message names the thing that failed and, where there is
/// one, the fix.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    /// `--config FILE` is not a valid configuration.
    #[error("invalid configuration\n{0}")]
    Config(#[from] ConfigError),

    /// A bad command line or `--from-file`.
    #[error("{0}")]
    Usage(String),

    /// The admin socket cannot be reached.
    #[error(transparent)]
    Socket(#[from] SocketError),

    /// The agent refused the call with a message meant for people (permission denied, no such
    /// entry, stale revision, invalid request).
    #[error("{0}")]
    Refused(String),

    /// The server on the socket does not serve the admin API.
    #[error(
        "the server at {} does not serve spiffed's admin API (spiffed.admin.v1.EntryAdmin): \
         is --admin-socket the Workload API socket, or the agent too old?",
        path.display()
    )]
    Unimplemented {
        /// The socket path.
        path: PathBuf,
    },

    /// Any other failure of a call.
    #[error("the admin API at {} failed: {code:?}: {message}", path.display())]
    Api {
        /// The socket path.
        path: PathBuf,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },

    /// The agent answered something this client cannot use.
    #[error("the admin API at {} sent a malformed answer: {what}", path.display())]
    Malformed {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },

    /// Some entries of a batch (or the one entry) failed; the details are printed already.
    #[error("{0}")]
    Failed(String),

    /// Standard output could not be written (a closed pipe, a full disk).
    #[error(transparent)]
    Stdout(#[from] StdoutError),
}

/// Exit status 64 for usage and configuration errors; an invalid configuration is printed as
/// `spiffed run` prints it.
impl Failure for AdminError {
    fn is_usage(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Usage(_))
    }

    fn stdout_error(&self) -> Option<&StdoutError> {
        match self {
            Self::Stdout(e) => Some(e),
            _ => None,
        }
    }

    fn unlabelled(&self) -> bool {
        matches!(self, Self::Config(_))
    }
}

impl AdminError {
    /// Classifies a failed call on `path`.
    fn from_status(path: &Path, status: &tonic::Status) -> Self {
        use tonic::Code;
        match status.code() {
            Code::PermissionDenied
            | Code::Unauthenticated
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::InvalidArgument
            | Code::OutOfRange
                if !status.message().is_empty() =>
            {
                Self::Refused(render::clean(status.message()))
            }
            Code::Unimplemented => Self::Unimplemented {
                path: path.to_path_buf(),
            },
            code => Self::Api {
                path: path.to_path_buf(),
                code,
                message: render::clean(status.message()),
            },
        }
    }
}

/// The admin socket: `--admin-socket`, else `admin_socket_path` of `--config`, else the
/// default. The file is read only when no `--admin-socket` is given.
fn socket_path(args: &AdminArgs) -> Result<PathBuf, AdminError> {
    if let Some(path) = &args.admin_socket {
        return Ok(path.clone());
    }
    if let Some(file) = &args.config {
        return Ok(Config::load(file)?.admin_socket_path);
    }
    Ok(PathBuf::from(DEFAULT_ADMIN_SOCKET_PATH))
}

/// Connects a channel to the admin socket at `path`.
async fn connect(path: &Path) -> Result<Channel, AdminError> {
    check_socket_file(Api::Admin, path)?;
    let target = path.to_path_buf();
    let endpoint = Endpoint::try_from("http://localhost")
        .map_err(|e| SocketError::from_connect(Api::Admin, path, e))?;
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_| {
            let target = target.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(target).await?,
                ))
            }
        }))
        .await
        .map_err(|e| SocketError::from_connect(Api::Admin, path, e))?;
    Ok(channel)
}

/// An open admin connection and where it goes, for messages.
struct Admin {
    /// The entry client.
    client: EntryAdminClient<Channel>,
    /// The bundle client, on the same connection.
    bundles: BundleAdminClient<Channel>,
    /// The socket path.
    path: PathBuf,
}

impl Admin {
    /// Resolves the socket from `args` and connects.
    async fn open(args: &AdminArgs) -> Result<Self, AdminError> {
        let path = socket_path(args)?;
        let channel = connect(&path).await?;
        Ok(Self {
            client: EntryAdminClient::new(channel.clone()),
            // A bundle is at most 1 MiB as JSON, and its X.509 authorities come with it.
            bundles: BundleAdminClient::new(channel).max_decoding_message_size(64 << 20),
            path,
        })
    }

    /// Turns a failed call into an [`AdminError`].
    fn status(&self, status: &tonic::Status) -> AdminError {
        AdminError::from_status(&self.path, status)
    }

    /// A malformed-answer error.
    fn malformed(&self, what: &str) -> AdminError {
        AdminError::Malformed {
            path: self.path.clone(),
            what: what.to_owned(),
        }
    }

    /// `GetEntry`.
    async fn get(&mut self, id: &str) -> Result<Entry, AdminError> {
        let request = GetEntryRequest { id: id.to_owned() };
        match self.client.get_entry(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.status(&status)),
        }
    }
}

/// `spiffed entry ...`.
pub(crate) async fn run_entry(args: &AdminArgs, cmd: EntryCommand) -> anyhow::Result<ExitCode> {
    let result = match cmd {
        EntryCommand::Create(create) => run_create(args, create).await,
        EntryCommand::List(list) => run_list(args, list).await,
        EntryCommand::Show { id } => run_show(args, &id).await,
        EntryCommand::Update(update) => run_update(args, update).await,
        EntryCommand::Delete { ids } => run_delete(args, ids).await,
    };
    Ok(result.unwrap_or_else(|e| fail(&e)))
}

/// Reads a `--from-file` document (`-` for stdin).
fn read_spec_file(file: &Path) -> Result<Vec<EntrySpec>, AdminError> {
    let text = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| AdminError::Usage(format!("cannot read the entries from stdin: {e}")))?;
        text
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| AdminError::Usage(format!("cannot read {}: {e}", file.display())))?
    };
    spec::parse_spec_file(&text).map_err(|e| AdminError::Usage(format!("{}: {e}", file.display())))
}

/// `spiffed entry create`.
async fn run_create(args: &AdminArgs, create: CreateArgs) -> Result<ExitCode, AdminError> {
    let batch = create.from_file.is_some();
    let specs = match &create.from_file {
        Some(file) => read_spec_file(file)?,
        None => vec![spec::overlay(
            &EntrySpec::default(),
            &SpecChanges::from_flags(
                create.spiffe_id,
                create.selectors,
                create.x509_svid_ttl,
                create.jwt_svid_ttl,
                create.hint,
                create.dns_names,
                false,
            )
            .with_federates_with(create.federates_with, false),
        )],
    };
    let mut admin = Admin::open(args).await?;
    let request = CreateEntriesRequest {
        entries: specs.clone(),
    };
    let (results, warnings) = match admin.client.create_entries(request).await {
        Ok(response) => {
            let r = response.into_inner();
            (r.results, r.warnings)
        }
        Err(status) => return Err(admin.status(&status)),
    };
    for warning in &warnings {
        err(format_args!("spiffed: warning: {}", render::clean(warning)));
    }
    if results.len() != specs.len() {
        return Err(admin.malformed(&format!(
            "{} result(s) for {} entr{}",
            results.len(),
            specs.len(),
            if specs.len() == 1 { "y" } else { "ies" }
        )));
    }
    if !batch {
        // One spec, one result.
        let result = results.into_iter().next().unwrap_or_default();
        return match (result.entry, result.error) {
            (_, Some(error)) => Err(AdminError::Failed(format!(
                "cannot create the entry: {}",
                render::entry_error_text(&error)
            ))),
            (Some(entry), None) => {
                print(
                    args.output,
                    &render::entry_text(&entry),
                    &render::entry_json(&entry),
                )?;
                Ok(ExitCode::SUCCESS)
            }
            (None, None) => Err(admin.malformed("neither an entry nor an error")),
        };
    }
    let failed = results
        .iter()
        .filter(|r| r.error.is_some() || r.entry.is_none())
        .count();
    match args.output {
        OutputFormat::Text => {
            for (i, result) in results.iter().enumerate() {
                out(render::create_result_line(i, specs.get(i), result))?;
            }
        }
        OutputFormat::Json => {
            let all: Vec<Value> = results.iter().map(render::create_result_json).collect();
            out(Value::Array(all))?;
        }
    }
    if failed > 0 {
        return Err(AdminError::Failed(format!(
            "{failed} of {} entries were not created",
            results.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// `spiffed entry list`: every page.
async fn run_list(args: &AdminArgs, list: ListArgs) -> Result<ExitCode, AdminError> {
    let mut admin = Admin::open(args).await?;
    let mut entries = Vec::new();
    let mut page_token = String::new();
    for _ in 0..MAX_PAGES {
        let request = ListEntriesRequest {
            spiffe_id: list.spiffe_id.clone().unwrap_or_default(),
            selector: list.selector.clone().unwrap_or_default(),
            page_size: PAGE_SIZE,
            page_token: page_token.clone(),
        };
        let page = match admin.client.list_entries(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(admin.status(&status)),
        };
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            print(
                args.output,
                &render::list_table(&entries),
                &render::entries_json(&entries),
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        if page.next_page_token == page_token {
            return Err(admin.malformed("the same next_page_token twice"));
        }
        page_token = page.next_page_token;
    }
    Err(admin.malformed(&format!("a listing of more than {MAX_PAGES} pages")))
}

/// `spiffed entry show ID`.
async fn run_show(args: &AdminArgs, id: &str) -> Result<ExitCode, AdminError> {
    let mut admin = Admin::open(args).await?;
    let entry = admin.get(id).await?;
    print(
        args.output,
        &render::entry_text(&entry),
        &render::entry_json(&entry),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `spiffed entry update ID ...`: fetch the entry, overlay the flags, send the full spec with
/// the expected revision.
async fn run_update(args: &AdminArgs, update: UpdateArgs) -> Result<ExitCode, AdminError> {
    let changes = SpecChanges::from_flags(
        update.spiffe_id,
        update.selectors,
        update.x509_svid_ttl,
        update.jwt_svid_ttl,
        update.hint,
        update.dns_names,
        update.clear_dns_names,
    )
    .with_federates_with(update.federates_with, update.clear_federates_with);
    if changes.is_empty() {
        return Err(AdminError::Usage(
            "nothing to update: pass at least one of --spiffe-id, --selector, --x509-svid-ttl, \
             --jwt-svid-ttl, --hint, --dns-name, --clear-dns-names, --federates-with, \
             --clear-federates-with"
                .to_owned(),
        ));
    }
    let mut admin = Admin::open(args).await?;
    let current = admin.get(&update.id).await?;
    let Some(current_spec) = &current.spec else {
        return Err(admin.malformed("an entry without a spec"));
    };
    let request = UpdateEntryRequest {
        id: update.id.clone(),
        // With --revision, a newer entry fails the update instead of being overwritten.
        expected_revision: update.revision.unwrap_or(current.revision),
        spec: Some(spec::overlay(current_spec, &changes)),
    };
    let entry = match admin.client.update_entry(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Err(admin.status(&status)),
    };
    print(
        args.output,
        &render::entry_text(&entry),
        &render::entry_json(&entry),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `spiffed entry delete ID...`.
async fn run_delete(args: &AdminArgs, ids: Vec<String>) -> Result<ExitCode, AdminError> {
    let mut admin = Admin::open(args).await?;
    let asked = ids.len();
    let results = match admin
        .client
        .delete_entries(DeleteEntriesRequest { ids })
        .await
    {
        Ok(response) => response.into_inner().results,
        Err(status) => return Err(admin.status(&status)),
    };
    if results.len() != asked {
        return Err(admin.malformed(&format!("{} result(s) for {asked} id(s)", results.len())));
    }
    match args.output {
        OutputFormat::Text => {
            for result in &results {
                out(render::delete_result_line(result))?;
            }
        }
        OutputFormat::Json => {
            let all: Vec<Value> = results.iter().map(render::delete_result_json).collect();
            out(Value::Array(all))?;
        }
    }
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        return Err(AdminError::Failed(format!(
            "{failed} of {asked} entries were not deleted"
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// `spiffed explain --pid PID`.
pub(crate) async fn run_explain(
    args: &AdminArgs,
    explain: &ExplainArgs,
) -> anyhow::Result<ExitCode> {
    let result = async {
        let mut admin = Admin::open(args).await?;
        let request = ExplainRequest { pid: explain.pid };
        let response = match admin.client.explain(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(admin.status(&status)),
        };
        print(
            args.output,
            &render::explain_text(&response),
            &render::explain_json(&response),
        )?;
        Ok(ExitCode::SUCCESS)
    }
    .await;
    Ok(result.unwrap_or_else(|e| fail(&e)))
}

/// `spiffed status`: the agent at a glance, from the admin socket.
pub(crate) async fn run_status(args: &AdminArgs) -> anyhow::Result<ExitCode> {
    let result = async {
        let mut admin = Admin::open(args).await?;
        let response = match admin.client.get_status(GetStatusRequest {}).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(admin.status(&status)),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        print(
            args.output,
            &render::status_text(&response, now),
            &render::status_json(&response),
        )?;
        Ok(ExitCode::SUCCESS)
    }
    .await;
    Ok(result.unwrap_or_else(|e| fail(&e)))
}
