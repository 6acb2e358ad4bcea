//! The client commands: `spiffed api ...` and `spiffed healthcheck`.
//!
//! These talk to a Workload API socket the way a workload does, through the `spiffe` crate's
//! [`WorkloadApiClient`] (which sends the `workload.spiffe.io: true` header on every call), and
//! print what they got for people (text) or scripts (`--output json`). Private keys are never
//! printed; they only reach disk through `--write DIR`, in files of mode 0600.
//!
//! Data flow: [`address`] resolves `--socket` / `SPIFFE_ENDPOINT_SOCKET` / the default into a
//! socket path; [`connect`] opens the client and turns failures into a [`ClientError`] that says
//! what to do; [`report`] turns an X.509 context or bundle set into text or JSON; [`jwt`]
//! fetches JWT-SVIDs and asks the agent to validate tokens; [`files`] writes PEM files
//! atomically; [`watch`] streams, reconnecting with backoff; [`health`] asks the standard gRPC
//! health service.

mod address;
mod files;
mod health;
mod jwt;
mod report;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use spiffe::transport::{Endpoint, GrpcStatusCode, TransportError};
use spiffe::{SpiffeId, WorkloadApiClient, WorkloadApiError};

pub(crate) use address::{AddressError, SocketAddress};
pub(crate) use files::pem_encode;
pub(crate) use report::{BundlesReport, X509Report};
pub(crate) use watch::{Backoff, shutdown_signal};

use crate::cli_common::output::{self, OutputFormat, StdoutError, output_format_parser, print};
use crate::cli_common::socket::{self, Api, SocketError, my_uid};
use crate::cli_common::{Failure, fail};

/// How long a one-shot command waits for the agent by default.
const DEFAULT_TIMEOUT: &str = "5s";

/// Where the Workload API is and how to print: shared by `spiffed api ...` and
/// `spiffed healthcheck`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct EndpointArgs {
    /// Workload API socket: a path or a unix:// URI. Default: $SPIFFE_ENDPOINT_SOCKET, else
    /// /run/spiffed/public/api.sock.
    #[arg(long, global = true, value_name = "SOCKET")]
    pub(crate) socket: Option<String>,
    /// Output format.
    #[arg(
        long,
        default_value = "text",
        global = true,
        value_parser = output_format_parser(
            "Readable text",
            "JSON: one object for `fetch`, one object per line for `watch`",
        )
    )]
    pub(crate) output: OutputFormat,
    /// How long to wait for the agent: to connect and receive the first answer (for `watch`,
    /// on each connection attempt).
    #[arg(
        long,
        global = true,
        default_value = DEFAULT_TIMEOUT,
        value_parser = humantime::parse_duration,
        value_name = "DURATION"
    )]
    pub(crate) timeout: Duration,
}

/// `spiffed api ...`: a Workload API client for people and scripts.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ApiCommand {
    /// Fetch identities or bundles once and print them.
    Fetch(FetchArgs),
    /// Stream X.509 contexts: print each update, optionally write files and run a command.
    Watch(WatchArgs),
    /// Ask the agent whether a token is valid, and print its identity and claims.
    Validate(ValidateArgs),
}

/// `spiffed api fetch ...`.
#[derive(clap::Args, Debug)]
pub(crate) struct FetchArgs {
    /// What to fetch.
    #[command(subcommand)]
    pub(crate) what: FetchCommand,
}

/// What `spiffed api fetch` fetches.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum FetchCommand {
    /// Fetch this process's X.509-SVIDs and the trust bundles that come with them.
    #[command(name = "x509")]
    X509(FetchX509Args),
    /// Fetch the trust bundles, per trust domain: X.509 and JWT authorities.
    Bundles,
    /// Fetch JWT-SVIDs for an audience and print them: token, SPIFFE ID, hint, expiry, audience.
    Jwt(FetchJwtArgs),
}

/// `spiffed api fetch jwt`.
#[derive(clap::Args, Debug)]
pub(crate) struct FetchJwtArgs {
    /// An audience the tokens are for (the `aud` claim). Repeat for several.
    #[arg(
        long,
        required = true,
        value_name = "AUDIENCE",
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    pub(crate) audience: Vec<String>,
    /// Fetch only this identity, e.g. spiffe://example.org/web. Default: every identity this
    /// process is entitled to.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub(crate) spiffe_id: Option<SpiffeId>,
}

/// `spiffed api validate ...`.
#[derive(clap::Args, Debug)]
pub(crate) struct ValidateArgs {
    /// What to validate.
    #[command(subcommand)]
    pub(crate) what: ValidateCommand,
}

/// What `spiffed api validate` validates.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ValidateCommand {
    /// Ask the agent whether a JWT-SVID is valid for an audience. Exit 0 and print the SPIFFE
    /// ID and claims when it is; exit 1 with the reason when it is not.
    #[command(name = "jwt")]
    Jwt(ValidateJwtArgs),
}

/// `spiffed api validate jwt`.
#[derive(clap::Args)]
pub(crate) struct ValidateJwtArgs {
    /// The audience the token must be for.
    #[arg(
        long,
        value_name = "AUDIENCE",
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    pub(crate) audience: String,
    /// The token, or - to read it from standard input (which keeps it out of the process
    /// list).
    #[arg(value_name = "TOKEN")]
    pub(crate) token: String,
}

impl std::fmt::Debug for ValidateJwtArgs {
    /// Never the token: it is a credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidateJwtArgs")
            .field("audience", &self.audience)
            .field("token_len", &self.token.len())
            .finish()
    }
}

/// `spiffed api fetch x509`.
#[derive(clap::Args, Debug)]
pub(crate) struct FetchX509Args {
    /// Write svid.N.pem (chain, leaf first), svid.N.key (PKCS#8, mode 0600) and bundle.N.pem
    /// for each SVID N into DIR, atomically. DIR is created if missing.
    #[arg(long, value_name = "DIR")]
    pub(crate) write: Option<PathBuf>,
    /// With --output json, add each SVID's private key (PKCS#8 PEM) as key_pem, as
    /// spire-agent's `-output json` does. The key is a secret: whoever reads the output holds
    /// the identity, so send it only where the key file would be safe. Without this flag no
    /// key is printed.
    #[arg(long)]
    pub(crate) include_key: bool,
}

/// `spiffed api watch`.
#[derive(clap::Args, Debug)]
pub(crate) struct WatchArgs {
    /// On every update, write svid.N.pem, svid.N.key (mode 0600) and bundle.N.pem into DIR,
    /// atomically. Files of SVIDs that are gone are removed. N follows the agent's order, so
    /// for a server that reads one identity's files use `spiffed helper` (the identity chosen
    /// by SPIFFE ID, every update switched in at once).
    #[arg(long, value_name = "DIR")]
    pub(crate) write: Option<PathBuf>,
    /// After every update (and after the files are written, with --write), run `sh -c CMD`
    /// in its own process group. Its exit status is logged; a failing command does not stop
    /// the watch. The watch never waits for it: a command still running when the next update
    /// arrives is killed (with its process group, logged) and the command runs again for the
    /// new update. If writing the files fails, the previous files are kept and the command is
    /// not run for that update.
    #[arg(long, value_name = "CMD")]
    pub(crate) exec: Option<String>,
    /// Kill the --exec command (and its process group) if it runs longer than this, e.g.
    /// 30s or 2m.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::serve::parse_duration)]
    pub(crate) exec_timeout: Duration,
}

/// Why a client command failed. Each message names the thing that failed and, where there is
/// one, the fix.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The socket address given is not one this client can use.
    #[error(transparent)]
    Address(#[from] AddressError),

    /// The Workload API socket cannot be reached, or the agent did not answer in time.
    #[error(transparent)]
    Socket(#[from] SocketError),

    /// The agent answered, but issues no identity to this process.
    #[error(
        "no identity issued for this process (uid {uid}): no registration entry matches it; \
         see `spiffed explain --pid PID` with the pid of a running process of this workload"
    )]
    NoIdentityIssued {
        /// This process's uid.
        uid: u32,
    },

    /// This process asked (`--spiffe-id`) for a SPIFFE ID it is not entitled to.
    #[error(
        "no identity issued: this process (uid {uid}) is not entitled to {spiffe_id}: leave out \
         --spiffe-id to see the identities it gets, or see `spiffed explain --pid PID` with the \
         pid of a running process of this workload"
    )]
    NotEntitled {
        /// The SPIFFE ID asked for.
        spiffe_id: String,
        /// This process's uid.
        uid: u32,
    },

    /// The agent denied the call for a reason other than "no identity issued".
    #[error("the Workload API at {} denied the call: {message}", path.display())]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
        /// The agent's message.
        message: String,
    },

    /// The agent rejected the request as invalid (gRPC `InvalidArgument`); retrying cannot help.
    #[error(
        "the Workload API at {} rejected the request as invalid: {source} (is it a SPIFFE \
         Workload API, with nothing in between that strips the workload.spiffe.io header?)",
        path.display()
    )]
    Rejected {
        /// The socket path.
        path: PathBuf,
        /// The rejection.
        #[source]
        source: WorkloadApiError,
    },

    /// The agent rejected what the request asked for (gRPC `InvalidArgument`), with its reason:
    /// a malformed `--spiffe-id`, say.
    #[error("the Workload API at {} rejected the request: {message}", path.display())]
    InvalidRequest {
        /// The socket path.
        path: PathBuf,
        /// The agent's reason.
        message: String,
    },

    /// A call made with the generated client (`api validate jwt`) failed with a gRPC status.
    #[error("the Workload API at {} failed: {code:?}: {message}", path.display())]
    Status {
        /// The socket path.
        path: PathBuf,
        /// The gRPC status code.
        code: tonic::Code,
        /// The agent's message.
        message: String,
    },

    /// The agent's answer lacks what the protocol requires.
    #[error("the Workload API at {} sent a malformed answer: {what}", path.display())]
    Malformed {
        /// The socket path.
        path: PathBuf,
        /// What is wrong with it.
        what: &'static str,
    },

    /// `--include-key` without `--output json`.
    #[error(
        "--include-key adds the private key to the JSON output; add --output json (text output \
         never shows keys; --write DIR writes them to files of mode 0600)"
    )]
    KeyNeedsJson,

    /// `api validate jwt` was given an empty token.
    #[error(
        "no token to validate: TOKEN is empty (pass the token, or - to read it from standard \
         input)"
    )]
    NoToken,

    /// Reading the token from standard input failed.
    #[error("cannot read the token from standard input: {0}")]
    ReadToken(#[source] std::io::Error),

    /// Any other failure of a Workload API call, or a malformed answer.
    #[error("the Workload API at {} failed: {source}", path.display())]
    Api {
        /// The socket path.
        path: PathBuf,
        /// What the client said.
        #[source]
        source: WorkloadApiError,
    },

    /// The agent ended a stream without an error.
    #[error("the Workload API at {} ended the stream", path.display())]
    StreamEnded {
        /// The socket path.
        path: PathBuf,
    },

    /// A certificate the agent sent could not be read for display.
    #[error("cannot read a certificate from the agent: {0}")]
    Certificate(String),

    /// Writing `--write` files failed.
    #[error(transparent)]
    Write(#[from] files::WriteError),

    /// Standard output could not be written (a closed pipe, a full disk).
    #[error(transparent)]
    Stdout(#[from] StdoutError),
}

/// Exit status 64 for a bad socket address or an empty token.
impl Failure for ClientError {
    fn is_usage(&self) -> bool {
        matches!(self, Self::Address(_) | Self::NoToken | Self::KeyNeedsJson)
    }

    fn stdout_error(&self) -> Option<&StdoutError> {
        match self {
            Self::Stdout(e) => Some(e),
            _ => None,
        }
    }
}

impl ClientError {
    /// Whether `api watch` should reconnect after this error. `InvalidArgument` is final
    /// (CONFORMANCE item 22), and so is a bad address; everything else may heal.
    pub(crate) fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Self::Rejected { .. }
                | Self::InvalidRequest { .. }
                | Self::Address(_)
                | Self::Stdout(_)
        )
    }

    /// Classifies a failed Workload API call on `path`.
    pub(crate) fn from_api(path: &Path, err: WorkloadApiError) -> Self {
        let path = path.to_path_buf();
        if err.is_invalid_argument() {
            return Self::Rejected { path, source: err };
        }
        match err {
            WorkloadApiError::NoIdentityIssued => Self::NoIdentityIssued { uid: my_uid() },
            WorkloadApiError::PermissionDenied(message) => Self::PermissionDenied { path, message },
            err @ WorkloadApiError::Transport(TransportError::Connect(_)) => {
                SocketError::from_connect(Api::Workload, &path, err).into()
            }
            err => Self::Api { path, source: err },
        }
    }
}

/// Reads `SPIFFE_ENDPOINT_SOCKET` and resolves the socket from the flag, that, or the default.
fn resolve_endpoint(endpoint: &EndpointArgs) -> Result<SocketAddress, ClientError> {
    let env = address::read_env()?;
    Ok(address::resolve(
        endpoint.socket.as_deref(),
        env.as_deref(),
    )?)
}

/// Resolves a socket address from a configured value (a flag or a config key) and
/// `SPIFFE_ENDPOINT_SOCKET`'s value, for commands that resolve on their own (`helper`).
pub(crate) fn resolve_address(
    value: Option<&str>,
    env: Option<&str>,
) -> Result<SocketAddress, AddressError> {
    address::resolve(value, env)
}

/// Reads `SPIFFE_ENDPOINT_SOCKET`.
pub(crate) fn read_socket_env() -> Result<Option<String>, AddressError> {
    address::read_env()
}

/// A time in RFC 3339, UTC, as the client commands print times.
pub(crate) fn rfc3339_system(t: std::time::SystemTime) -> String {
    report::rfc3339(time::OffsetDateTime::from(t))
}

/// Connects a Workload API client to the socket.
pub(crate) async fn connect(addr: &SocketAddress) -> Result<WorkloadApiClient, ClientError> {
    socket::check_socket_file(Api::Workload, &addr.path)?;
    WorkloadApiClient::connect(Endpoint::Unix(addr.path.clone()))
        .await
        .map_err(|e| ClientError::from_api(&addr.path, e))
}

/// Opens a gRPC channel to the socket, for the calls made with generated clients (the health
/// check, `ValidateJWTSVID`). Send each request through [`api_request`].
pub(crate) async fn connect_channel(
    addr: &SocketAddress,
) -> Result<tonic::transport::Channel, ClientError> {
    socket::check_socket_file(Api::Workload, &addr.path)?;
    spiffe::transport::connect(&Endpoint::Unix(addr.path.clone()))
        .await
        .map_err(|e| ClientError::from_api(&addr.path, e.into()))
}

/// A request with the Workload API header, which every call to the socket carries
/// (CONFORMANCE item 110).
pub(crate) fn api_request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// Runs `fut` within `timeout`, turning a timeout into [`SocketError::Timeout`].
async fn within<T>(
    addr: &SocketAddress,
    timeout: Duration,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_elapsed| {
            Err(SocketError::Timeout {
                api: Api::Workload,
                path: addr.path.clone(),
                after: timeout,
            }
            .into())
        })
}

/// Fetches the X.509 context once and summarizes it. With no `timeout`, the caller bounds it.
async fn fetch_x509(
    addr: &SocketAddress,
) -> Result<(spiffe::X509Context, X509Report), ClientError> {
    let started = tokio::time::Instant::now();
    let client = connect(addr).await?;
    let context = client
        .fetch_x509_context()
        .await
        .map_err(|e| ClientError::from_api(&addr.path, e))?;
    let report = X509Report::from_context(&context, Some(started.elapsed()))?;
    Ok((context, report))
}

/// Fetches the X.509 and JWT bundles once, side by side, and summarizes them by trust domain.
/// An agent that does not serve the JWT profile (`Unimplemented`) gets a warning and an
/// X.509-only report.
async fn fetch_bundles(addr: &SocketAddress) -> Result<BundlesReport, ClientError> {
    let started = tokio::time::Instant::now();
    let client = connect(addr).await?;
    let (x509, jwt) = futures::join!(client.fetch_x509_bundles(), client.fetch_jwt_bundles());
    let x509 = x509.map_err(|e| ClientError::from_api(&addr.path, e))?;
    let jwt = match jwt {
        Ok(set) => Some(set),
        Err(WorkloadApiError::Transport(TransportError::Status(status)))
            if status.code() == GrpcStatusCode::Unimplemented =>
        {
            output::err(format_args!(
                "spiffed: the Workload API at {} does not serve JWT bundles ({}): showing X.509 \
                 authorities only",
                addr.path.display(),
                status.message()
            ));
            None
        }
        Err(e) => return Err(ClientError::from_api(&addr.path, e)),
    };
    BundlesReport::from_sets(&x509, jwt.as_ref(), Some(started.elapsed()))
}

/// Used by `spiffed dev` to prove its socket works: fetch once and render as `api fetch x509`
/// would. `socket` is a path or a `unix:` URI. The caller bounds the time it may take.
pub(crate) async fn fetch_x509_report(socket: &str) -> anyhow::Result<X509Report> {
    let addr = address::resolve(Some(socket), None)?;
    let (_context, report) = fetch_x509(&addr).await?;
    Ok(report)
}

/// `spiffed api ...`.
pub(crate) async fn run_api(endpoint: &EndpointArgs, cmd: ApiCommand) -> anyhow::Result<ExitCode> {
    let addr = match resolve_endpoint(endpoint) {
        Ok(addr) => addr,
        Err(e) => return Ok(fail(&e)),
    };
    let result = match cmd {
        ApiCommand::Fetch(FetchArgs {
            what: FetchCommand::X509(args),
        }) => run_fetch_x509(&addr, endpoint, &args).await,
        ApiCommand::Fetch(FetchArgs {
            what: FetchCommand::Bundles,
        }) => within(&addr, endpoint.timeout, fetch_bundles(&addr))
            .await
            .and_then(|report| {
                print(endpoint.output, &report.render_text(), &report.to_json())?;
                Ok(ExitCode::SUCCESS)
            }),
        ApiCommand::Fetch(FetchArgs {
            what: FetchCommand::Jwt(args),
        }) => within(
            &addr,
            endpoint.timeout,
            jwt::fetch(&addr, &args.audience, args.spiffe_id.as_ref()),
        )
        .await
        .and_then(|report| {
            print(endpoint.output, &report.render_text(), &report.to_json())?;
            Ok(ExitCode::SUCCESS)
        }),
        ApiCommand::Watch(args) => {
            watch::run(&addr, &args, endpoint.output, endpoint.timeout).await
        }
        ApiCommand::Validate(ValidateArgs {
            what: ValidateCommand::Jwt(args),
        }) => run_validate_jwt(&addr, endpoint, &args).await,
    };
    Ok(result.unwrap_or_else(|e| fail(&e)))
}

/// `spiffed api fetch x509`.
async fn run_fetch_x509(
    addr: &SocketAddress,
    endpoint: &EndpointArgs,
    args: &FetchX509Args,
) -> Result<ExitCode, ClientError> {
    if args.include_key && endpoint.output != OutputFormat::Json {
        return Err(ClientError::KeyNeedsJson);
    }
    let (context, report) = within(addr, endpoint.timeout, fetch_x509(addr)).await?;
    if let Some(dir) = &args.write {
        let written = files::write_x509_context(dir, &context)?;
        output::err(format_args!(
            "spiffed: wrote {} file(s) to {}",
            written.len(),
            dir.display()
        ));
    }
    if args.include_key {
        let keys: Vec<_> = context
            .svids()
            .iter()
            .map(|svid| files::pem_encode("PRIVATE KEY", [svid.private_key().as_bytes()]))
            .collect();
        let line = report::json_with_keys(&report.to_json(), &keys)
            .map_err(|e| ClientError::Certificate(format!("cannot render the JSON: {e}")))?;
        output::out(line.as_str())?;
    } else {
        print(endpoint.output, &report.render_text(), &report.to_json())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `spiffed api validate jwt`: exit 0 when the agent says the token is valid, 1 with the
/// reason when it is not (or when the agent cannot be asked).
async fn run_validate_jwt(
    addr: &SocketAddress,
    endpoint: &EndpointArgs,
    args: &ValidateJwtArgs,
) -> Result<ExitCode, ClientError> {
    // Standard input is read before the clock starts: --timeout is for the agent.
    let token = jwt::read_token(&args.token)?;
    let verdict = within(
        addr,
        endpoint.timeout,
        jwt::validate(addr, &args.audience, &token),
    )
    .await?;
    match (endpoint.output, verdict.is_valid()) {
        (OutputFormat::Text, true) => output::out(verdict.render_text())?,
        (OutputFormat::Text, false) => output::err(verdict.render_text()),
        (OutputFormat::Json, valid) => {
            output::out(verdict.to_json())?;
            if !valid {
                output::err(verdict.render_text());
            }
        }
    }
    Ok(if verdict.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `spiffed healthcheck`: exit 0 when an agent serves on the socket, 1 otherwise.
pub(crate) async fn run_healthcheck(endpoint: &EndpointArgs) -> anyhow::Result<ExitCode> {
    let addr = match resolve_endpoint(endpoint) {
        Ok(addr) => addr,
        Err(e) => return Ok(fail(&e)),
    };
    let outcome = match within(&addr, endpoint.timeout, health::check(&addr)).await {
        Ok(outcome) => outcome,
        Err(e) => {
            if endpoint.output == OutputFormat::Json
                && let Err(out) = output::out(health::failure_json(&addr, &e))
            {
                return Ok(fail(&out));
            }
            return Ok(fail(&e));
        }
    };
    // Agent mode also says whether identities are served (and from where); an agent that runs
    // but serves no identity is not healthy.
    let answered = matches!(
        outcome,
        health::HealthOutcome::Serving | health::HealthOutcome::NotServing(_)
    );
    let report = if answered {
        tokio::time::timeout(endpoint.timeout, health::agent_report(&addr))
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    let serving = outcome.is_serving() && health::report_blocks(&report).is_none();
    let printed = match endpoint.output {
        OutputFormat::Json => {
            let mut json = outcome.to_json(&addr);
            health::report_json(&report, &mut json);
            output::out(json)
        }
        OutputFormat::Text if serving => match health::describe_report(&report) {
            Some(more) => output::out(format_args!(
                "spiffed is serving on {}, {more}",
                addr.path.display()
            )),
            None => output::out(format_args!(
                "spiffed is serving on {}",
                addr.path.display()
            )),
        },
        OutputFormat::Text => {
            match health::describe_report(&report).filter(|_| answered) {
                Some(more) => output::err(format_args!(
                    "spiffed: the agent on {} runs but is {more}",
                    addr.path.display()
                )),
                None => output::err(format_args!("spiffed: {}", outcome.describe(&addr))),
            }
            Ok(())
        }
    };
    if let Err(e) = printed {
        return Ok(fail(&e));
    }
    Ok(if serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
