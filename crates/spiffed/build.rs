//! The agent binary's function order at link time (`packaging/build-ordered.sh`).
//!
//! When `SPIFFED_SYMBOL_ORDERING_FILE` names a file of symbol names, the `spiffed` binary is
//! linked with it as lld's `--symbol-ordering-file`: the functions it lists (those the agent
//! runs while it starts and serves, `packaging/symbol-order.txt`) are placed first and
//! together, so that the agent maps fewer pages of its own code. Unset (every ordinary build),
//! nothing changes. It needs lld (rustc's default linker on x86_64 Linux since 1.90).

use std::env;
use std::path::Path;

fn main() -> Result<(), String> {
    println!("cargo:rerun-if-env-changed=SPIFFED_SYMBOL_ORDERING_FILE");
    let Some(file) = env::var_os("SPIFFED_SYMBOL_ORDERING_FILE") else {
        return Ok(());
    };
    let file = Path::new(&file);
    if !(file.is_absolute() && file.is_file()) {
        return Err(format!(
            "SPIFFED_SYMBOL_ORDERING_FILE must name an existing file by its absolute path, not {}",
            file.display()
        ));
    }
    println!("cargo:rerun-if-changed={}", file.display());
    println!(
        "cargo:rustc-link-arg-bin=spiffed=-Wl,--symbol-ordering-file={}",
        file.display()
    );
    // A listed name the binary does not have (left out by the optimiser, or gone since the
    // list was made) is skipped quietly, not a warning per name.
    println!("cargo:rustc-link-arg-bin=spiffed=-Wl,--no-warn-symbol-ordering");
    Ok(())
}
