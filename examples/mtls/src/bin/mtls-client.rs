//! mTLS client whose identity comes from the SPIFFE Workload API (spiffed).
//!
//! ```text
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/spiffed/public/api.sock \
//!   mtls-client --connect 127.0.0.1:8443 --server-id spiffe://example.org/server \
//!               --count 12 --interval 700ms
//! ```
//!
//! Opens ONE long-lived TLS connection, sends `--count` lines one per `--interval` and prints
//! each echo. Half-way through it waits until its SVID has been rotated (if that has not happened
//! yet), opens a second connection, which must handshake with the new SVID, and checks it
//! works. The first connection stays open throughout: an established TLS session does not depend
//! on the certificate it was set up with. Exit status 0 when every echo came back, 1 otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use rustls::pki_types::ServerName;
use spiffe::X509Source;
use spiffe_rustls::{LocalOnly, TlsStatus, authorizer, mtls_client};
use spiffed_example_mtls::{Leaf, current_leaf, leaf, now_unix, parse_id, x509_source};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long to wait for one echo, for a rotation, or for the TLS material to catch up.
const WAIT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(about = "mTLS client with its SVID from the SPIFFE Workload API")]
struct Args {
    /// Server address.
    #[arg(long)]
    connect: SocketAddr,
    /// The server's expected SPIFFE ID; any other server is refused.
    #[arg(long)]
    server_id: String,
    /// Lines to send over the long-lived connection.
    #[arg(long, default_value_t = 10)]
    count: u32,
    /// Pause between lines (e.g. 500ms, 2s).
    #[arg(long, default_value = "500ms")]
    interval: humantime::Duration,
    /// How long to wait for the first SVID from the Workload API.
    #[arg(long, default_value = "30s")]
    svid_timeout: humantime::Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtls-client: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One TLS connection: its line reader, its writer, and the client SVID it was opened with.
struct Conn {
    name: &'static str,
    lines: Lines<BufReader<ReadHalf<TlsStream<TcpStream>>>>,
    write: WriteHalf<TlsStream<TcpStream>>,
    svid: Leaf,
}

struct Client {
    source: X509Source,
    status: TlsStatus,
    connector: TlsConnector,
    addr: SocketAddr,
}

async fn run(args: Args) -> Result<()> {
    let server_id = parse_id(&args.server_id)?;

    // Connects to SPIFFE_ENDPOINT_SOCKET and keeps following the agent's updates.
    let source = x509_source(args.svid_timeout.into()).await?;

    // Presents our current SVID, verifies the server against our trust domain's bundle, and
    // accepts exactly one server SPIFFE ID. The TLS server name below is not what is checked.
    let (config, status) = mtls_client(source.clone())
        .authorize(authorizer::exact([server_id.clone()])?)
        .trust_domain_policy(LocalOnly(server_id.trust_domain().clone()))
        .build_with_status()
        .context("build the rustls ClientConfig")?;
    let client = Client {
        source,
        status,
        connector: TlsConnector::from(Arc::new(config)),
        addr: args.connect,
    };

    let mut conn1 = client.open("connection 1").await?;
    tokio::spawn(log_rotations(client.source.clone()));
    let half = args.count / 2;
    for i in 1..=args.count {
        if i > 1 {
            tokio::time::sleep(args.interval.into()).await;
        }
        conn1.echo(&format!("line {i}")).await?;

        if i == half.max(1) {
            // "Survives rotation": a new handshake after the agent rotated our SVID.
            client.wait_for_rotation(&conn1.svid).await?;
            let mut conn2 = client.open("connection 2").await?;
            if conn2.svid.serial == conn1.svid.serial {
                bail!("connection 2 was opened with the same SVID as connection 1");
            }
            conn2.echo("hello over a new handshake").await?;
            conn2.close().await;
        }
    }

    let now = now_unix();
    let age = now - conn1.svid.not_after;
    if age > 0 {
        println!(
            "connection 1 outlived its client SVID (serial {}, expired {age}s ago)",
            conn1.svid.serial
        );
    } else {
        println!(
            "connection 1 is still within its client SVID's lifetime (serial {})",
            conn1.svid.serial
        );
    }
    conn1.close().await;
    println!("OK: {n}/{n} echoes over one connection", n = args.count);
    client.source.shutdown().await;
    Ok(())
}

impl Client {
    /// Handshakes a new connection and prints which client SVID it presents.
    async fn open(&self, name: &'static str) -> Result<Conn> {
        self.wait_tls_ready().await?;
        // The serial we print is the source's current SVID: the one the handshake presents.
        let svid = current_leaf(&self.source)?;
        println!(
            "{name}: client SVID {} serial {} (expires in {}s)",
            svid.spiffe_id,
            svid.serial,
            svid.not_after - now_unix()
        );
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("{name}: connect to {}", self.addr))?;
        // rustls needs a server name; spiffe-rustls authenticates by SPIFFE ID instead.
        let name_ip = ServerName::from(self.addr.ip());
        let tls = self
            .connector
            .connect(name_ip, tcp)
            .await
            .with_context(|| format!("{name}: TLS handshake"))?;
        if let Some(der) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            let server = leaf(der.as_ref())?;
            println!(
                "{name}: server {} serial {}",
                server.spiffe_id, server.serial
            );
        }
        let (read, write) = tokio::io::split(tls);
        Ok(Conn {
            name,
            lines: BufReader::new(read).lines(),
            write,
            svid,
        })
    }

    /// Waits until the source holds an SVID other than `old` (the agent re-mints at half-life).
    async fn wait_for_rotation(&self, old: &Leaf) -> Result<()> {
        let mut updates = self.source.updated();
        let wait = async {
            while current_leaf(&self.source)?.serial == old.serial {
                updates.changed().await.context("X509Source closed")?;
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .context("no SVID rotation within 30s")?
    }

    /// A handshake needs the TLS layer to have converted the source's latest revision; right
    /// after a rotation that can take a moment. (A service would simply retry; the example
    /// waits so that the serial it prints is the one presented.)
    async fn wait_tls_ready(&self) -> Result<()> {
        let mut status = self.status.clone();
        let wait = async {
            loop {
                let now = status.current();
                if now.available {
                    return anyhow::Ok(());
                }
                // Also poll: `changed` only fires on a conversion, not on source revisions.
                let _ = tokio::time::timeout(Duration::from_millis(50), status.changed()).await;
            }
        };
        tokio::time::timeout(WAIT, wait).await.map_err(|_| {
            anyhow::anyhow!("TLS material not ready: {:?}", status_error(&self.status))
        })?
    }
}

/// Prints every SVID the agent pushes while we run: the rotations connection 1 lives through.
async fn log_rotations(source: X509Source) {
    let mut updates = source.updated();
    while updates.changed().await.is_ok() {
        if let Ok(svid) = current_leaf(&source) {
            println!(
                "rotation: the source now holds client SVID serial {} (expires in {}s)",
                svid.serial,
                svid.not_after - now_unix()
            );
        }
    }
}

fn status_error(status: &TlsStatus) -> Option<String> {
    status.current().error.map(|e| e.to_string())
}

impl Conn {
    /// Sends one line and checks the echo `<our spiffe id>: <line>`.
    async fn echo(&mut self, line: &str) -> Result<()> {
        let name = self.name;
        self.write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("{name}: send {line:?}"))?;
        let reply = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .with_context(|| format!("{name}: no echo for {line:?} within 30s"))?
            .with_context(|| format!("{name}: read the echo of {line:?}"))?
            .with_context(|| format!("{name}: server closed the connection"))?;
        println!("{name}: echo: {reply}");
        let want = format!("{}: {line}", self.svid.spiffe_id);
        if reply != want {
            bail!("{name}: expected {want:?}, got {reply:?}");
        }
        Ok(())
    }

    async fn close(mut self) {
        let _ = self.write.shutdown().await;
    }
}
