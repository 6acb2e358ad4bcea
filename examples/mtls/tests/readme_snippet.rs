//! The README's Rust snippet ("use it from your service"), compiled so it cannot rot. It needs an
//! agent to run; `tests/mtls.rs` runs the same calls end to end.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

// --- README snippet starts (keep in sync with README.md) ---
use spiffe::X509Source;
use spiffe_rustls::{LocalOnly, authorizer, mtls_client, mtls_server};

#[allow(dead_code, reason = "compiled, not run")]
async fn readme_snippet(
    tcp_stream: TcpStream,
    client_stream: TcpStream,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let source = X509Source::new().await?; // SPIFFE_ENDPOINT_SOCKET; follows rotations

    // Server: require a client SVID of example.org, admit one SPIFFE ID.
    let server = mtls_server(source.clone())
        .authorize(authorizer::exact(["spiffe://example.org/client"])?)
        .trust_domain_policy(LocalOnly("example.org".try_into()?))
        .build()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let _tls = acceptor.accept(tcp_stream).await?; // an unauthorized client fails here

    // Client: accept one server SPIFFE ID; the server name is not what is checked.
    let client = mtls_client(source.clone())
        .authorize(authorizer::exact(["spiffe://example.org/server"])?)
        .trust_domain_policy(LocalOnly("example.org".try_into()?))
        .build()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let _tls = connector
        .connect(ServerName::from(addr.ip()), client_stream)
        .await?;
    Ok(())
}
// --- README snippet ends ---

#[test]
fn readme_snippet_compiles() {
    // Referencing it is enough: the point is that the snippet type-checks.
    let _ = readme_snippet;
}
