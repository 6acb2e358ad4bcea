//! Small helpers shared by `mtls-server` and `mtls-client`: what a certificate says about itself.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
use spiffe::{SpiffeId, X509Source};
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// What the example prints about an X.509-SVID leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The SPIFFE ID in the URI SAN.
    pub spiffe_id: String,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Reads a DER certificate (an SVID leaf).
pub fn leaf(der: &[u8]) -> Result<Leaf> {
    let (_, cert) = X509Certificate::from_der(der).context("parse certificate")?;
    let serial = cert.raw_serial().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    let spiffe_id = spiffe::cert::spiffe_id_from_der(der)
        .map_or_else(|_| "<no SPIFFE ID>".to_owned(), |id| id.to_string());
    Ok(Leaf {
        spiffe_id,
        serial,
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The leaf of the SVID the source holds right now (what the next handshake presents).
pub fn current_leaf(source: &X509Source) -> Result<Leaf> {
    let svid = source.svid().context("the X509Source holds no SVID")?;
    leaf(svid.leaf().as_bytes())
}

/// Connects to the Workload API at `SPIFFE_ENDPOINT_SOCKET` and waits for the first X.509-SVID.
///
/// The returned source keeps following the agent's stream, so every SVID the agent re-mints
/// reaches the TLS configs built from it without a restart. `X509Source::new` retries forever
/// while the agent says "no identity issued" (a process no entry matches), so this bounds it.
pub async fn x509_source(wait: Duration) -> Result<X509Source> {
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET")
        .context("SPIFFE_ENDPOINT_SOCKET is not set (e.g. unix:///run/spiffed/public/api.sock)")?;
    match tokio::time::timeout(wait, X509Source::new()).await {
        Ok(source) => source.with_context(|| format!("get an X.509-SVID from {endpoint}")),
        Err(_) => anyhow::bail!(
            "no X.509-SVID from {endpoint} within {}s: is the agent serving there, and does a \
             registration entry match this process? (`spiffed explain --pid PID` tells why not)",
            wait.as_secs()
        ),
    }
}

/// Parses a SPIFFE ID given on the command line.
pub fn parse_id(s: &str) -> Result<SpiffeId> {
    SpiffeId::new(s).with_context(|| format!("not a SPIFFE ID: {s}"))
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
