//! mTLS echo server whose identity comes from the SPIFFE Workload API (spiffed).
//!
//! ```text
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/spiffed/public/api.sock \
//!   mtls-server --listen 127.0.0.1:0 --allow spiffe://example.org/client
//! ```
//!
//! Prints `LISTENING <port>` on stdout once it accepts connections. Every connection must present
//! an X.509-SVID that chains to the trust domain's bundle and carries exactly the `--allow`
//! SPIFFE ID; anyone else is refused during the handshake (logged on stderr with the peer's ID).
//! Each line received is echoed back as `<peer spiffe id>: <line>`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Parser;
use spiffe_rustls::{LocalOnly, authorizer, mtls_server};
use spiffed_example_mtls::{current_leaf, leaf, parse_id, x509_source};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio_rustls::TlsAcceptor;

#[derive(Parser)]
#[command(about = "mTLS echo server with its SVID from the SPIFFE Workload API")]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed as `LISTENING <port>`).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The one client SPIFFE ID admitted.
    #[arg(long)]
    allow: String,
    /// How long to wait for the first SVID from the Workload API.
    #[arg(long, default_value = "30s")]
    svid_timeout: humantime::Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtls-server: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let allow = parse_id(&args.allow)?;

    // Connects to SPIFFE_ENDPOINT_SOCKET, waits for the first SVID, then follows the agent's
    // stream: every rotation spiffed pushes lands here without a restart.
    let source = x509_source(args.svid_timeout.into()).await?;
    let me = current_leaf(&source)?;
    eprintln!("mtls-server: my SVID {} serial {}", me.spiffe_id, me.serial);

    // The rustls config reads the current SVID and bundle from the source at every handshake.
    // It requires a client certificate, verifies it against the bundle of our own trust domain
    // only, then admits exactly one SPIFFE ID.
    let config = mtls_server(source.clone())
        .authorize(authorizer::exact([allow.clone()])?)
        .trust_domain_policy(LocalOnly(allow.trust_domain().clone()))
        .build()
        .context("build the rustls ServerConfig")?;
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let port = listener.local_addr()?.port();
    println!("LISTENING {port}");
    eprintln!(
        "mtls-server: listening on {}, admitting only {allow}",
        listener.local_addr()?
    );

    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = accepted.context("accept")?;
                tokio::spawn(serve(acceptor.clone(), tcp, peer));
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("mtls-server: shutting down");
    source.shutdown().await;
    Ok(())
}

async fn serve(acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            // An unauthorized client fails here. The verifier's error names its SPIFFE ID
            // ("peer SPIFFE ID is not authorized: spiffe://...").
            eprintln!("mtls-server: refused {peer}: {e}");
            return;
        }
    };
    // The handshake succeeded, so the client presented a certificate the verifier accepted.
    let client = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|der| leaf(der.as_ref()));
    let client = match client {
        Some(Ok(client)) => client,
        Some(Err(e)) => {
            eprintln!("mtls-server: {peer}: unreadable client certificate: {e:#}");
            return;
        }
        None => {
            eprintln!("mtls-server: {peer}: no client certificate");
            return;
        }
    };
    eprintln!(
        "mtls-server: accepted {peer} as {} (client SVID serial {})",
        client.spiffe_id, client.serial
    );

    let (read, mut write) = tokio::io::split(tls);
    let mut lines = BufReader::new(read).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                let reply = format!("{}: {line}\n", client.spiffe_id);
                if let Err(e) = write.write_all(reply.as_bytes()).await {
                    eprintln!("mtls-server: {peer}: write: {e}");
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                eprintln!("mtls-server: {peer}: read: {e}");
                return;
            }
        }
    }
    let _ = write.shutdown().await;
    eprintln!("mtls-server: {peer} ({}) closed", client.spiffe_id);
}
