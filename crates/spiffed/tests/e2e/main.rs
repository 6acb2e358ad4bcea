//! End-to-end tests: the real `spiffed` binary on a temporary socket, real kernel credentials,
//! and clients we did not write (the Rust `spiffe` crate) next to a raw generated client.
//!
//! One test binary with submodules, to save link time.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod admin;
mod agent_mode;
mod attest;
mod cli;
mod federation;
mod federation_peers;
mod files;
mod fleet;
mod helper;
mod interop;
mod jwt;
mod lifecycle;
mod limits;
mod package;
mod sds;
mod sds_probe;
mod spire_harness;
mod symbol_order;
mod telemetry;
mod upstream;
mod x509;

use std::path::PathBuf;

use spiffed_test_support::Agent;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The spiffed binary under test.
fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spiffed"))
}

/// The peer helper binary (a second bin target of this package).
fn peer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spiffed-test-peer"))
}

/// Lifetimes short enough to watch SVID, JWT key and CA rotations within seconds: SVIDs and
/// tokens of 2s, a CA of 4s, with the floors (`min_svid_ttl`, `min_ca_ttl`) lowered for tests.
const SHORT_TTLS: &str = "x509_svid_ttl = \"2s\"\njwt_svid_ttl = \"2s\"\nca_ttl = \"4s\"\nmin_svid_ttl = \"1s\"\nmin_ca_ttl = \"1s\"\n";

/// Starts an agent whose entries grant the test's own uid `spiffe://example.org/web`.
fn agent_for_me(extra: &str) -> Agent {
    let uid = spiffed_test_support::my_uid();
    Agent::start(
        &bin(),
        &format!(
            "{extra}\n[[entries]]\nspiffe_id = \"spiffe://example.org/web\"\nselectors = [\"unix:uid:{uid}\"]\nhint = \"internal\"\ndns_names = [\"web.internal\"]\n"
        ),
    )
}

/// Where a test node's identities come from.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// The embedded CA, entries in the config file.
    Standalone,
    /// Agent mode: a real spire-server holds the entries and signs the SVIDs.
    Agent,
}

impl Mode {
    const ALL: [Mode; 2] = [Mode::Standalone, Mode::Agent];
}

/// An entry for [`node_with`]: the same in both modes.
struct TestEntry<'a> {
    spiffe_id: &'a str,
    selectors: Vec<String>,
    hint: Option<&'a str>,
    dns_names: &'a [&'a str],
}

impl<'a> TestEntry<'a> {
    fn new(spiffe_id: &'a str, selectors: &[String]) -> Self {
        Self {
            spiffe_id,
            selectors: selectors.to_vec(),
            hint: None,
            dns_names: &[],
        }
    }
}

/// A spiffed serving `entries` in `mode`, and the spire-server behind it in agent mode.
struct Node {
    agent: Agent,
    _server: Option<spiffed_test_support::spire::SpireServer>,
}

/// Starts a node in `mode` with `entries`; in agent mode, returns once the node has synced
/// them all from the server.
fn node_with(mode: Mode, entries: &[TestEntry<'_>]) -> Node {
    match mode {
        Mode::Standalone => {
            let mut toml = String::new();
            for e in entries {
                let sels: Vec<String> = e.selectors.iter().map(|s| format!("{s:?}")).collect();
                toml.push_str(&format!(
                    "[[entries]]\nspiffe_id = {:?}\nselectors = [{}]\n",
                    e.spiffe_id,
                    sels.join(", ")
                ));
                if let Some(h) = e.hint {
                    toml.push_str(&format!("hint = {h:?}\n"));
                }
                if !e.dns_names.is_empty() {
                    toml.push_str(&format!("dns_names = {:?}\n", e.dns_names));
                }
            }
            Node {
                agent: Agent::start(&bin(), &toml),
                _server: None,
            }
        }
        Mode::Agent => {
            use spiffed_test_support::spire::{EntrySpec, ServerOptions, SpireServer};
            let server = SpireServer::start(ServerOptions::default());
            let token = server.generate_token(None, None);
            let parent = server.join_token_agent_id(&token);
            for e in entries {
                let sels: Vec<&str> = e.selectors.iter().map(String::as_str).collect();
                let mut spec = EntrySpec::workload(&parent, e.spiffe_id, &sels);
                spec.hint = e.hint.map(str::to_owned);
                spec.dns_names = e.dns_names.iter().map(|d| (*d).to_owned()).collect();
                server.entry_create(&spec);
            }
            let agent = agent_mode::node(&server, agent_mode::Attest::Token(&token), "");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let out = std::process::Command::new(bin())
                    .args(["entry", "list", "--output", "json", "--admin-socket"])
                    .arg(&agent.admin_socket)
                    .output()
                    .unwrap();
                let listed = String::from_utf8_lossy(&out.stdout);
                if entries.iter().all(|e| listed.contains(e.spiffe_id)) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the node never synced its entries:\n{}",
                    agent.logs()
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Node {
                agent,
                _server: Some(server),
            }
        }
    }
}

/// Splits concatenated DER certificates.
fn split_der(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![];
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der).expect("concatenated DER certificates");
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    out
}

/// Checks that the chain's leaf is signed by one of the bundle's CAs, currently valid, and
/// never outlives its signer.
fn verify_chain(chain: &[u8], bundle: &[u8]) {
    let certs = split_der(chain);
    let (_, leaf) = X509Certificate::from_der(&certs[0]).unwrap();
    let roots = split_der(bundle);
    assert!(!roots.is_empty(), "empty bundle");
    let signer = roots
        .iter()
        .map(|r| X509Certificate::from_der(r).unwrap().1)
        .find(|r| leaf.verify_signature(Some(r.public_key())).is_ok())
        .unwrap_or_else(|| {
            panic!(
                "leaf {} is not signed by any CA in its bundle",
                leaf.raw_serial_as_string()
            )
        });
    assert!(leaf.validity().is_valid(), "leaf not currently valid");
    assert!(leaf.validity().not_after <= signer.validity().not_after);
    assert_eq!(leaf.issuer().as_raw(), signer.subject().as_raw());
}
