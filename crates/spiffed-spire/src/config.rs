//! The `[spire_server]` block of the config file, as the agent runs with it.
//!
//! `spiffed-agent` parses and checks the file (unknown keys, paths, the address) and builds a
//! [`SpireConfig`]; this crate only uses it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroizing;

/// How often the agent syncs entries and bundles with the server unless configured
/// (`sync_interval`), as spire-agent.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// Agent mode's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpireConfig {
    /// Where the server listens: a DNS name or an IP address, and a port. Every address the
    /// name resolves to is used, with failover between them.
    pub address: ServerAddress,
    /// What authenticates the server before the agent has a bundle of its own.
    pub bootstrap: Bootstrap,
    /// How the node proves its identity to the server.
    pub attestation: NodeAttestation,
    /// How often entries and bundles are synced (±10 % jitter).
    pub sync_interval: Duration,
}

/// A server address: host (a DNS name or an IP address) and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddress {
    /// A DNS name, or an IP address (IPv6 without brackets).
    pub host: String,
    /// The TCP port.
    pub port: u16,
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "address {0:?} is not HOST:PORT; write e.g. \"spire-server.example.org:8081\", \
     \"127.0.0.1:8081\" or \"[::1]:8081\""
)]
pub struct AddressError(pub String);

impl std::str::FromStr for ServerAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AddressError(s.to_owned());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, rest) = rest.split_once(']').ok_or_else(bad)?;
            (host, rest.strip_prefix(':').ok_or_else(bad)?)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
            if host.contains(':') {
                return Err(bad());
            }
            (host, port)
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
        if !host_ok || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// What authenticates the server on the first attestation. Once the agent has attested, the
/// bundle it stored takes precedence (as in spire-agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// The server's X.509 authorities from a file.
    Bundle {
        /// The file.
        path: PathBuf,
        /// Its format.
        format: BundleFormat,
    },
    /// No chain verification (tests only; logged loudly). The server's SVID must still carry
    /// exactly the ID `spiffe://TD/spire/server`.
    Insecure,
}

/// The format of `trust_bundle_path`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BundleFormat {
    /// PEM certificates (the default, as `spire-server bundle show`).
    #[default]
    Pem,
    /// A SPIFFE bundle (JWKS with `x509-svid` keys; `spire-server bundle show -format spiffe`).
    Spiffe,
}

/// How the node attests to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeAttestation {
    /// A join token (single use; not needed once the agent has attested and kept its state).
    JoinToken(Option<JoinToken>),
    /// A certificate and its key, chaining to a CA the server's x509pop attestor trusts.
    X509Pop {
        /// The node certificate (PEM).
        certificate_path: PathBuf,
        /// Its private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
        private_key_path: PathBuf,
        /// Intermediate certificates between it and the server's CA (PEM), if any.
        intermediates_path: Option<PathBuf>,
    },
}

/// A join token: zeroized on drop, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(Zeroizing<String>);

impl JoinToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(Zeroizing::new(token.into()))
    }

    /// The token.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_names_ipv4_and_bracketed_ipv6() {
        let a: ServerAddress = "spire-server.example.org:8081".parse().unwrap();
        assert_eq!(
            (a.host.as_str(), a.port),
            ("spire-server.example.org", 8081)
        );
        let a: ServerAddress = "127.0.0.1:18081".parse().unwrap();
        assert_eq!(a.to_string(), "127.0.0.1:18081");
        let a: ServerAddress = "[::1]:8081".parse().unwrap();
        assert_eq!(
            (a.host.as_str(), a.to_string().as_str()),
            ("::1", "[::1]:8081")
        );
        for bad in [
            "",
            "host",
            "host:",
            ":8081",
            "host:0",
            "host:99999",
            "::1:8081",
            "a b:1",
        ] {
            let e = bad.parse::<ServerAddress>().unwrap_err();
            assert!(e.to_string().contains("HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn join_tokens_are_not_printed() {
        let t = JoinToken::new("s3cret");
        assert!(!format!("{t:?}").contains("s3cret"));
        assert_eq!(t.expose(), "s3cret");
    }
}
