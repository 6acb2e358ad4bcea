//! Clients we did not write, against the real binary: go-spiffe, py-spiffe, the `spire-agent`
//! CLI and java-spiffe (tests/interop/run.sh installs each from its package registry into a
//! cache outside the checkout and prints a client x check matrix).

use std::path::Path;
use std::process::Command;

use crate::bin;

#[test]
fn foreign_clients_pass_every_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("tests/interop/run.sh"))
        .env("SPIFFED_BIN", bin())
        .output()
        .expect("bash runs tests/interop/run.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Kept beside the binaries so CI can print the matrix after the test run.
    let _ = std::fs::write(bin().with_file_name("interop-matrix.txt"), &text);
    assert!(out.status.success(), "interop suite failed:\n{text}");
    assert!(
        text.contains("interop: ") && text.contains(" 0 failed"),
        "{text}"
    );
}
