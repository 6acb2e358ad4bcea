#!/usr/bin/env bash
# packaging/build-ordered.sh: builds the spiffed binary with its functions in link order: the code
# the agent runs while it starts and serves (packaging/symbol-order.txt) first and together, so
# that the agent maps fewer pages of its own binary (idle RSS about 3 MiB lower; BENCHMARKS.md).
#
#   packaging/build-ordered.sh [PROFILE]      PROFILE: a cargo profile, default dist
#
# Honours CARGO_TARGET_DIR (default target/); prints the binary's path on stdout. Two links of the
# same build: the first gives the symbol names of this toolchain, profile and lockfile (their
# hashes differ between builds; the list's names have none), the second links with them as lld's
# --symbol-ordering-file (crates/spiffed/build.rs; lld is rustc's default linker on x86_64 Linux).
# Only the spiffed crate is compiled twice. Needs python3 and binutils (nm, c++filt).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PROFILE="${1:-dist}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
TARGET="$(mkdir -p "$TARGET" && cd "$TARGET" && pwd)"
PDIR="$PROFILE"
[[ "$PROFILE" == dev ]] && PDIR=debug

die() {
    printf 'build-ordered.sh: %s\n' "$*" >&2
    exit 1
}
for tool in nm c++filt python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install binutils python3)"
done

build() {
    (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET" cargo build --locked --profile "$PROFILE" -p spiffed) >&2 ||
        die "cargo build --profile $PROFILE -p spiffed failed (output above)"
}

printf '== build-ordered.sh: link 1 of 2 (symbol names)\n' >&2
(unset SPIFFED_SYMBOL_ORDERING_FILE && build)
BIN="$TARGET/$PDIR/spiffed"
[[ -x "$BIN" ]] || die "cargo wrote no $BIN"
ORDER="$TARGET/$PDIR/spiffed.symbol-order"
python3 "$HERE/symbol_order.py" map "$HERE/symbol-order.txt" "$BIN" "$ORDER" ||
    die "mapping packaging/symbol-order.txt onto $BIN failed"

printf '== build-ordered.sh: link 2 of 2 (with %s)\n' "$ORDER" >&2
SPIFFED_SYMBOL_ORDERING_FILE="$ORDER" build
echo "$BIN"
