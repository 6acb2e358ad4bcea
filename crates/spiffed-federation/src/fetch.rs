//! The bundle endpoint client: one `GET` of a peer's bundle endpoint over HTTPS, authenticated
//! per profile (see [`crate::tls`]), with a deadline for the whole exchange and a bound on the
//! body. What comes back is the body's bytes; parsing and checking the bundle is the caller's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{ServerName, TrustAnchor};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::{
    SpiffeEndpointVerifier, TlsError, describe_handshake_error, provider, read_certs,
};

/// Where Debian and its derivatives keep the Web PKI roots of the host.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How a peer's endpoint is authenticated.
#[derive(Clone, Debug)]
pub enum Profile {
    /// `https_web`: a Web PKI certificate for the URL's host, chaining to `roots`.
    HttpsWeb {
        /// The roots (the host's and any configured).
        roots: Arc<RootCertStore>,
    },
    /// `https_spiffe`: an X.509-SVID with exactly `endpoint_id`, chaining to the X.509
    /// authorities of `trust_domain`'s bundle.
    HttpsSpiffe {
        /// The endpoint's trust domain (for messages).
        trust_domain: String,
        /// The endpoint's SPIFFE ID.
        endpoint_id: String,
        /// The X.509 authorities of the bundle held for that trust domain.
        anchors: Vec<TrustAnchor<'static>>,
    },
}

/// The roots for `https_web`: those of `system` (when the file exists; [`SYSTEM_ROOTS`] by
/// default) and every certificate in `extra`.
pub fn web_roots(system: Option<&Path>, extra: &[PathBuf]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let system = system.unwrap_or(Path::new(SYSTEM_ROOTS));
    if system.exists() {
        // A host bundle may hold a certificate rustls cannot use: skip those, keep the rest.
        let (_added, _ignored) = store.add_parsable_certificates(read_certs(system)?);
    }
    for path in extra {
        for cert in read_certs(path)? {
            store.add(cert).map_err(|e| TlsError::File {
                path: path.display().to_string(),
                why: format!("a certificate in it is not a usable root: {e}"),
            })?;
        }
    }
    if store.is_empty() {
        return Err(TlsError::Unusable(format!(
            "no Web PKI roots: {} is missing and no extra roots are configured; install \
             ca-certificates or configure the endpoint's root certificates",
            system.display()
        )));
    }
    Ok(store)
}

/// The fetch's limits (`[[federation.trust_domains]]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchLimits {
    /// The whole exchange: resolve, connect, handshake, request and body.
    pub timeout: Duration,
    /// The largest body accepted.
    pub max_body_bytes: usize,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// Why a fetch failed. Each message names the URL's part that failed and, where there is one,
/// the fix.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL is not an `https://` URL with a host.
    #[error("bad bundle endpoint URL {url:?}: {why}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The host name did not resolve, or no address answered.
    #[error("cannot connect to {authority}: {why}")]
    Connect {
        /// host:port.
        authority: String,
        /// What failed.
        why: String,
    },
    /// The TLS handshake failed (for `https_spiffe`, our verifier's reason).
    #[error("{authority}: {why}")]
    Tls {
        /// host:port.
        authority: String,
        /// What failed.
        why: String,
    },
    /// The HTTP exchange failed.
    #[error("{authority}: HTTP: {why}")]
    Http {
        /// host:port.
        authority: String,
        /// What failed.
        why: String,
    },
    /// The endpoint answered something else than 200.
    #[error("{authority}: the endpoint answered {status}")]
    Status {
        /// host:port.
        authority: String,
        /// The status.
        status: StatusCode,
    },
    /// The body is larger than the limit.
    #[error(
        "{authority}: the bundle is larger than {limit} bytes (max_bundle_bytes); a SPIFFE \
         bundle is a few KiB: is the URL that of a bundle endpoint?"
    )]
    TooLarge {
        /// host:port.
        authority: String,
        /// The limit.
        limit: usize,
    },
    /// Nothing complete came within the deadline.
    #[error("{authority}: no complete answer within {after:?}")]
    Timeout {
        /// host:port.
        authority: String,
        /// The deadline.
        after: Duration,
    },
}

/// A parsed endpoint URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointUrl {
    host: String,
    port: u16,
    path_and_query: String,
    text: String,
}

impl EndpointUrl {
    /// Parses an `https://host[:port][/path]` URL.
    pub fn parse(url: &str) -> Result<Self, FetchError> {
        let bad = |why: &str| FetchError::BadUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad(
                "it must start with https:// (bundle endpoints are HTTPS)",
            ));
        }
        let authority = uri.authority().ok_or_else(|| bad("it has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information is not allowed in it"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("it has no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(443),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            text: url.to_owned(),
        })
    }

    /// `host:port`, for messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn client_config(profile: &Profile) -> Result<Arc<ClientConfig>, rustls::Error> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut config = match profile {
        Profile::HttpsWeb { roots } => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        Profile::HttpsSpiffe {
            trust_domain,
            endpoint_id,
            anchors,
        } => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeEndpointVerifier::new(
                trust_domain,
                endpoint_id,
                anchors.clone(),
            )))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No resumption: a resumed session would skip the check against a changed bundle.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Fetches the body at `url`, authenticated per `profile`, within `limits`.
pub async fn fetch(
    url: &EndpointUrl,
    profile: &Profile,
    limits: FetchLimits,
) -> Result<Bytes, FetchError> {
    let authority = url.authority();
    tokio::time::timeout(limits.timeout, fetch_inner(url, profile, limits))
        .await
        .unwrap_or(Err(FetchError::Timeout {
            authority,
            after: limits.timeout,
        }))
}

async fn fetch_inner(
    url: &EndpointUrl,
    profile: &Profile,
    limits: FetchLimits,
) -> Result<Bytes, FetchError> {
    let authority = url.authority();
    let connect_error = |why: String| FetchError::Connect {
        authority: authority.clone(),
        why,
    };
    let addrs: Vec<_> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| connect_error(format!("cannot resolve {}: {e}", url.host)))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        connect_error(last.unwrap_or_else(|| format!("{} has no address", url.host)))
    })?;
    let config = client_config(profile).map_err(|e| FetchError::Tls {
        authority: authority.clone(),
        why: e.to_string(),
    })?;
    let name = ServerName::try_from(url.host.clone()).map_err(|e| FetchError::BadUrl {
        url: url.text.clone(),
        why: format!("the host is not a valid name: {e}"),
    })?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| FetchError::Tls {
            authority: authority.clone(),
            why: describe_handshake_error(&e),
        })?;
    let http_error = |why: String| FetchError::Http {
        authority: authority.clone(),
        why,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| http_error(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let host = if url.port == 443 {
        url.host.clone()
    } else {
        authority.clone()
    };
    let request = Request::get(url.path_and_query.as_str())
        .header(header::HOST, host)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("spiffed/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| http_error(e.to_string()))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http_error(e.to_string()))?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status {
                authority: authority.clone(),
                status: response.status(),
            });
        }
        let too_large = || FetchError::TooLarge {
            authority: authority.clone(),
            limit: limits.max_body_bytes,
        };
        if let Some(len) = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > limits.max_body_bytes as u64
        {
            return Err(too_large());
        }
        let body = Limited::new(response.into_body(), limits.max_body_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    too_large()
                } else {
                    http_error(format!("reading the body: {e}"))
                }
            })?;
        Ok(body.to_bytes())
    }
    .await;
    driver.abort();
    result
}
