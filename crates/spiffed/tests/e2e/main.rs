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
mod files;
mod interop;
mod jwt;
mod lifecycle;
mod limits;
mod spire_harness;
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
