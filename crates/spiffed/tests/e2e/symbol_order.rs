//! The link-order tooling (`packaging/symbol_order.py`, used by `packaging/build-ordered.sh` and
//! `packaging/symbol-order-train.sh`) on a small Rust program built here with the same compiler
//! and linker as the agent: a real callgrind profile names the functions that ran (and not those
//! that did not), the names are mapped onto a
//! build, and lld's `--symbol-ordering-file` (the flag `crates/spiffed/build.rs` passes) puts
//! exactly those first. The agent's own two-link build is measured by the benchmarks
//! (BENCHMARKS.md), not here: it takes two fat-LTO links.

use spiffed_test_support::run_ok;
use spiffed_test_support::spire::repo_root;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A program whose `main` runs `hot_first` and `hot_second`. The cold functions come first in
/// the source, so an ordinary link places some of them before the hot ones; they exist (an
/// argument count nobody passes calls them) but never run.
const PROGRAM: &str = r#"
use std::hint::black_box;
#[inline(never)] fn cold_a(x: u64) -> u64 { black_box(x).wrapping_mul(3).rotate_left(7) }
#[inline(never)] fn cold_b(x: u64) -> u64 { black_box(x).wrapping_mul(5).rotate_left(9) }
#[inline(never)] fn cold_c(x: u64) -> u64 { black_box(x).wrapping_mul(7).rotate_left(11) }
#[inline(never)] fn hot_first(x: u64) -> u64 { black_box(x).wrapping_mul(11).rotate_left(13) }
#[inline(never)] fn hot_second(x: u64) -> u64 { black_box(x).wrapping_mul(13).rotate_left(15) }
fn main() {
    let n = std::env::args().count() as u64;
    let mut v = hot_first(n) ^ hot_second(n);
    if n > 100 {
        v ^= cold_a(n) ^ cold_b(n) ^ cold_c(n);
    }
    println!("{v}");
}
"#;

/// `nm`'s text symbols of `bin`: (address, demangled name).
fn text_symbols(bin: &Path) -> Vec<(u64, String)> {
    let out = run_ok(
        Command::new("nm")
            .args(["--defined-only", "--demangle=rust"])
            .arg(bin),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ' ');
            let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
            let kind = parts.next()?;
            let name = parts.next()?;
            matches!(kind, "t" | "T").then(|| (addr, name.to_string()))
        })
        .collect()
}

/// The test program's own functions, for messages.
fn own_functions(syms: &[(u64, String)]) -> Vec<&(u64, String)> {
    syms.iter()
        .filter(|(_, n)| n.starts_with("main::"))
        .collect()
}

fn address_of(syms: &[(u64, String)], suffix: &str) -> u64 {
    let hits: Vec<u64> = syms
        .iter()
        .filter(|(_, n)| n.ends_with(suffix))
        .map(|(a, _)| *a)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "one symbol ending in {suffix}, found {hits:?}"
    );
    hits[0]
}

fn rustc(dir: &Path, extra: &[String]) -> PathBuf {
    let bin = dir.join("spiffed");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    run_ok(
        Command::new(rustc)
            .args(["--edition=2021", "-C", "opt-level=1", "-C", "debuginfo=0"])
            .args(extra)
            .arg("-o")
            .arg(&bin)
            .arg(dir.join("main.rs")),
    );
    bin
}

#[test]
fn profiled_functions_are_linked_first_and_only_they() {
    for tool in ["valgrind", "nm", "c++filt", "python3"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false),
            "{tool} is not installed: the link-order tooling needs it (Debian: valgrind, binutils, python3)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("main.rs"), PROGRAM).unwrap();
    let script = repo_root().join("packaging/symbol_order.py");

    // An ordinary link: some cold function sits before a hot one.
    let bin = rustc(dir.path(), &[]);
    let plain = text_symbols(&bin);
    let hot = ["::hot_first", "::hot_second"];
    let cold = ["::cold_a", "::cold_b", "::cold_c"];
    let last_hot_plain = hot.iter().map(|h| address_of(&plain, h)).max().unwrap();
    assert!(
        cold.iter().any(|c| address_of(&plain, c) < last_hot_plain),
        "the test needs a layout with cold code among the hot; got {:?}",
        own_functions(&plain)
    );

    // Profile it, as packaging/symbol-order-train.sh does.
    let profile = dir.path().join("callgrind.out");
    run_ok(
        Command::new("valgrind")
            .args(["--tool=callgrind", "--demangle=no"])
            .arg(format!("--callgrind-out-file={}", profile.display()))
            .arg(&bin),
    );
    let list = dir.path().join("symbol-order.txt");
    run_ok(
        Command::new("python3")
            .arg(&script)
            .arg("names")
            .arg(&list)
            .arg(&profile),
    );
    let listed = fs::read_to_string(&list).unwrap();
    for h in hot {
        assert!(
            listed.lines().any(|l| l.ends_with(h)),
            "{h} ran but is not listed:\n{listed}"
        );
    }
    for c in cold {
        assert!(
            !listed.lines().any(|l| l.ends_with(c)),
            "{c} never ran but is listed:\n{listed}"
        );
    }
    assert!(
        !listed.contains("]::"),
        "the list keeps no crate hashes:\n{listed}"
    );

    // Map the list onto the build and link it again with the order, as build-ordered.sh does.
    let order = dir.path().join("order");
    let out = run_ok(
        Command::new("python3")
            .arg(&script)
            .arg("map")
            .arg(&list)
            .arg(&bin)
            .arg(&order),
    );
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(report.contains("listed functions found"), "{report}");
    let ordered_bin = rustc(
        dir.path(),
        &[
            "-C".to_string(),
            format!("link-arg=-Wl,--symbol-ordering-file={}", order.display()),
        ],
    );
    let ordered = text_symbols(&ordered_bin);
    let last_hot = hot.iter().map(|h| address_of(&ordered, h)).max().unwrap();
    for c in cold {
        assert!(
            address_of(&ordered, c) > last_hot,
            "{c} is not after every profiled function in the ordered build: {:?}",
            own_functions(&ordered)
        );
    }
    // The program still runs the same.
    let a = run_ok(&mut Command::new(&bin)).stdout;
    let b = run_ok(&mut Command::new(&ordered_bin)).stdout;
    assert_eq!(a, b);
}
