#!/usr/bin/env bash
# Builds spiffed's Debian packages (amd64): spiffed_VERSION_amd64.deb and
# spiffed-dbgsym_VERSION_amd64.deb, plus spiffed.debug beside them, and prints the .deb's path.
#
#   packaging/build-deb.sh [OUT_DIR]        # default ~/.cache/spiffed-pkg/out
#
# The binary is built for glibc 2.31 (Debian 11 and newer, Ubuntu 20.04 and newer) with
# cargo-zigbuild and zig, both installed on first use into ~/.cache/spiffed-pkg (tools/ and
# zigenv/), with the `deb` cargo profile (release, thin LTO, debug info), into
# ~/.cache/spiffed-pkg/target (SPIFFED_PKG_TARGET_DIR overrides it). The debug info is split
# off into spiffed.debug (shipped in the -dbgsym package, found by build ID or debuglink);
# the packaged binary keeps its symbol table (for perf and backtraces) but no DWARF.
#
# Needs: cargo, python3 (venv + pip, for zig from PyPI), dpkg-deb, binutils (objcopy,
# readelf), gzip. Environment: SPIFFED_PKG_CACHE (default ~/.cache/spiffed-pkg).
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC_FLOOR=2.31
ZIG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1
TRIPLE=x86_64-unknown-linux-gnu

cache="${SPIFFED_PKG_CACHE:-$HOME/.cache/spiffed-pkg}"
out="${1:-$cache/out}"
tools="$cache/tools"
zigenv="$cache/zigenv"
export CARGO_TARGET_DIR="${SPIFFED_PKG_TARGET_DIR:-$cache/target}"
export CARGO_TERM_COLOR=never
log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { printf 'build-deb: FAILED: %s\n' "$*" >&2; exit 1; }

for tool in cargo python3 dpkg-deb objcopy readelf gzip; do
  command -v "$tool" >/dev/null ||
    die "$tool is not installed (Debian: apt-get install cargo python3-venv dpkg-dev binutils gzip)"
done

# zig (the C compiler and linker that targets an old glibc), from PyPI into a venv of its own.
if ! "$zigenv/bin/python3" -c 'import ziglang' 2>/dev/null; then
  log "installing zig $ZIG_VERSION (PyPI ziglang) into $zigenv"
  python3 -m venv "$zigenv"
  "$zigenv/bin/pip" install --quiet "ziglang==$ZIG_VERSION"
fi
# cargo-zigbuild, from crates.io into tools/.
if ! "$tools/bin/cargo-zigbuild" --version >/dev/null 2>&1; then
  log "installing cargo-zigbuild $CARGO_ZIGBUILD_VERSION into $tools"
  cargo install --locked --root "$tools" cargo-zigbuild --version "$CARGO_ZIGBUILD_VERSION"
fi
# cargo-zigbuild runs zig as `python3 -m ziglang` when no `zig` is on PATH: the venv's python3
# first on PATH is that python3.
export PATH="$zigenv/bin:$tools/bin:$PATH"

# Run from `cargo test` (the e2e test package::), the environment holds the test package's
# CARGO_PKG_*, CARGO_MANIFEST_* and such; some build scripts (ring's) rerun when those change,
# so the tree would be rebuilt every time the script runs from a shell after the test or back.
for name in $(compgen -e); do
  case "$name" in
    CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_CRATE_NAME | CARGO_BIN_* | CARGO_PRIMARY_PACKAGE | \
      CARGO_TARGET_TMPDIR | CARGO_CFG_* | CARGO_RUSTC_CURRENT_DIR | OUT_DIR) unset "$name" ;;
  esac
done
# A build ID in the binary, so that gdb and debuginfod find spiffed.debug in the -dbgsym
# package (/usr/lib/debug/.build-id/XX/YYYY.debug). Only for the target, not build scripts.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C link-arg=-Wl,--build-id=sha1"
started=$(date +%s)
log "building spiffed for $TRIPLE with glibc $GLIBC_FLOOR (cargo profile 'deb') in $CARGO_TARGET_DIR"
cargo zigbuild --locked --profile deb -p spiffed --bin spiffed --target "$TRIPLE.$GLIBC_FLOOR"
built="$CARGO_TARGET_DIR/$TRIPLE/deb/spiffed"
[ -x "$built" ] || die "cargo zigbuild wrote no $built"
log "built in $(($(date +%s) - started))s"

# Everything below is staged in a temp dir and moved into $out at the end.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Which glibc the binary needs: the highest GLIBC_x.y among its versioned symbol needs.
glibc_needed=$(readelf --version-info -W "$built" | grep -o 'GLIBC_[0-9][0-9.]*' |
  sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n -k3,3n -u | tail -n1)
[ -n "$glibc_needed" ] || die "readelf found no GLIBC_ version need in $built"
if [ "$(printf '%s\n%s\n' "$glibc_needed" "$GLIBC_FLOOR" | sort -V | tail -n1)" != "$GLIBC_FLOOR" ]; then
  die "$built needs glibc $glibc_needed, above the floor $GLIBC_FLOOR"
fi
# Its shared libraries, each mapped to the Debian package that has it (bullseye's names).
shlibs="libc6 (>= $glibc_needed)"
for lib in $(readelf -d -W "$built" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
  case "$lib" in
    libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux-x86-64.so.2) ;;
    libgcc_s.so.1) shlibs="$shlibs, libgcc-s1" ;;
    *) die "$built links $lib, which this script does not map to a Debian package" ;;
  esac
done

build_id=$(readelf -n "$built" | sed -n 's/^ *Build ID: *\([0-9a-f]*\)$/\1/p')
[ ${#build_id} -ge 8 ] || die "$built has no build ID (the linker ignored --build-id)"
version=$("$built" --version | awk '{print $2}')
[ -n "$version" ] || die "cannot read the version of $built"

# Split the debug info off: spiffed.debug keeps it, the binary keeps only a link to it.
# (zlib-compressed sections: a third of the size, and gdb reads them as they are)
objcopy --only-keep-debug --compress-debug-sections=zlib "$built" "$work/spiffed.debug"
cp "$built" "$work/spiffed"
objcopy --strip-debug --add-gnu-debuglink="$work/spiffed.debug" "$work/spiffed"
chmod 0644 "$work/spiffed.debug"
chmod 0755 "$work/spiffed"
# (grep without -q reads to the end: no SIGPIPE for readelf under pipefail; readelf complains
# of the debug file's empty .interp on stderr)
sections() { readelf -S -W "$1" 2>/dev/null | grep -c '\.debug_info' || true; }
[ "$(sections "$work/spiffed")" = 0 ] || die "the stripped binary still has .debug_info"
[ "$(sections "$work/spiffed.debug")" != 0 ] || die "spiffed.debug has no .debug_info"

# The main package's tree.
root="$work/root"
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/etc/spiffed" \
  "$root/usr/lib/systemd/system" "$root/usr/share/man/man1" "$root/usr/share/doc/spiffed" \
  "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d"
install -m 0755 "$work/spiffed" "$root/usr/bin/spiffed"
install -m 0644 packaging/spiffed.toml "$root/etc/spiffed/spiffed.toml"
install -m 0644 packaging/spiffed.service "$root/usr/lib/systemd/system/spiffed.service"
install -m 0644 LICENSE "$root/usr/share/doc/spiffed/copyright"
# Man pages and completions come from the clap definitions, through the binary just built.
"$work/spiffed" man --dir "$root/usr/share/man/man1" 2>/dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
"$work/spiffed" completions bash >"$root/usr/share/bash-completion/completions/spiffed"
"$work/spiffed" completions zsh >"$root/usr/share/zsh/vendor-completions/_spiffed"
"$work/spiffed" completions fish >"$root/usr/share/fish/vendor_completions.d/spiffed.fish"
find "$root/usr/share" -type f -exec chmod 0644 {} +
for s in postinst prerm postrm; do install -m 0755 "packaging/debian/$s" "$root/DEBIAN/$s"; done
echo /etc/spiffed/spiffed.toml >"$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@INSTALLED_SIZE@/$size/" -e "s/@SHLIBS@/$shlibs/" \
  packaging/debian/control.in >"$root/DEBIAN/control"

# The -dbgsym package: the debug file under its build ID.
dbg="$work/dbgsym"
dbgfile="usr/lib/debug/.build-id/${build_id:0:2}/${build_id:2}.debug"
install -d -m 0755 "$dbg/DEBIAN" "$dbg/$(dirname "$dbgfile")" "$dbg/usr/share/doc"
install -m 0644 "$work/spiffed.debug" "$dbg/$dbgfile"
ln -s spiffed "$dbg/usr/share/doc/spiffed-dbgsym"
size=$(du -sk --exclude=DEBIAN "$dbg" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@INSTALLED_SIZE@/$size/" -e "s/@BUILD_ID@/$build_id/" \
  packaging/debian/dbgsym-control.in >"$dbg/DEBIAN/control"

# Every file in the archives owned by root.
deb="spiffed_${version}_amd64.deb"
dbgdeb="spiffed-dbgsym_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$work/$deb" >/dev/null
dpkg-deb --root-owner-group -Zxz --build "$dbg" "$work/$dbgdeb" >/dev/null

# Into $out, each file renamed into place so that a reader never sees half a package.
mkdir -p "$out"
for f in "$deb" "$dbgdeb" spiffed.debug; do
  cp "$work/$f" "$out/.$f.tmp"
  mv -f "$out/.$f.tmp" "$out/$f"
done
log "glibc needed: $glibc_needed (floor $GLIBC_FLOOR); build ID $build_id"
log "debug info: $out/spiffed.debug and $out/$dbgdeb"
echo "$out/$deb"
