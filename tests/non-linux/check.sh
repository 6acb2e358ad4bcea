#!/usr/bin/env bash
# Checks that building spiffed for an OS other than Linux stops with spiffed-attest's one
# message (the compile_error! at the top of crates/spiffed-attest/src/lib.rs), for the targets
# a port would aim at, and that a Linux target does not print it.
#
# No other target's standard library (nor rust-src, for -Zbuild-std) is installed here, and
# rustc stops at "can't find crate for `std`" before it expands any macro. So each target gets
# a stand-in `std` (fake_std.rs: no_core, only the prelude's built-in compile_error!), built as
# metadata for that target with the nightly compiler, and spiffed-attest's lib.rs is checked
# against it: the first error must be ours. (The errors after it are the stand-in's missing
# modules.) With a real standard library for the target, cargo stops at the same place.
#
#   tests/non-linux/check.sh          # needs `rustup toolchain install nightly`
set -euo pipefail
cd "$(dirname "$0")/../.."

lib=crates/spiffed-attest/src/lib.rs
expected='spiffed is Linux-only'
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

check() { # TARGET -> the first error rustc reports for lib.rs on TARGET ("" if none)
  local target=$1
  mkdir -p "$tmp/$target"
  rustc +nightly -A internal_features --edition 2024 --crate-type rlib --emit metadata \
    --crate-name std --target "$target" -o "$tmp/$target/libstd.rmeta" tests/non-linux/fake_std.rs
  { rustc +nightly --edition 2024 --crate-type lib --emit metadata --target "$target" \
    -L "$tmp/$target" -o "$tmp/$target/out.rmeta" "$lib" 2>&1 || true; } |
    grep -m1 '^error' || true
}

failed=0
for target in x86_64-unknown-freebsd aarch64-apple-darwin x86_64-apple-darwin \
  x86_64-unknown-netbsd x86_64-unknown-openbsd x86_64-unknown-illumos x86_64-pc-windows-msvc; do
  first=$(check "$target")
  if [[ "$first" == "error: $expected"* ]]; then
    echo "non-linux: $target stops with: ${first:0:100}..."
  else
    echo "non-linux: FAILED: $target's first error is not spiffed-attest's message: $first"
    failed=1
  fi
done
# The control: on Linux the message must not appear (the stand-in std makes other errors).
first=$(check x86_64-unknown-linux-gnu)
if [[ "$first" == *"$expected"* ]]; then
  echo "non-linux: FAILED: x86_64-unknown-linux-gnu reports the non-Linux message"
  failed=1
else
  echo "non-linux: x86_64-unknown-linux-gnu does not report it (control)"
fi
exit "$failed"
