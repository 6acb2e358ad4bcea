#!/usr/bin/env bash
# Builds spire-server and spire-agent v1.13.3 for the agent-mode tests, or reuses the cached ones.
#
#   tests/spire/build.sh
#
# Prints the directory holding both binaries on stdout (one line); progress and errors go to
# stderr. Only a missing binary is built, from the module in bench/spire/tool (its go.mod and
# go.sum pin both tools), into a cache outside the checkout:
#   ${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}/spire/v1.13.3/bin/
# Builds are serialized with the lock file tests/interop/spire/check.sh uses, so the interop
# check, this script and parallel tests never build the same version twice. The first build
# downloads many modules through the Go proxy and takes minutes on 2 cores.
#
# Exit status: 0 with the directory printed; 2 when go is missing or the build fails.
set -euo pipefail

SPIRE_VERSION=v1.13.3
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TOOL_DIR="$ROOT/bench/spire/tool"
CACHE="${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}"
BIN_DIR="$CACHE/spire/$SPIRE_VERSION/bin"
TOOLS=(spire-server spire-agent)

log() { echo "# tests/spire/build.sh: $*" >&2; }
die() { echo "tests/spire/build.sh: $*" >&2; exit 2; }

missing() {
    local t out=()
    for t in "${TOOLS[@]}"; do
        [[ -x "$BIN_DIR/$t" ]] || out+=("$t")
    done
    echo "${out[*]}"
}

if [[ -n "$(missing)" ]]; then
    command -v go >/dev/null ||
        die "go not found on PATH; it is needed once to build $(missing) $SPIRE_VERSION (install Go >= 1.25, or put the binaries in $BIN_DIR)"
    grep -q "github.com/spiffe/spire $SPIRE_VERSION" "$TOOL_DIR/go.mod" ||
        die "$TOOL_DIR/go.mod does not pin github.com/spiffe/spire $SPIRE_VERSION"
    mkdir -p "$CACHE/spire" "$CACHE/go/pkg/mod" "$CACHE/go-build"
    # Serialize concurrent builds of the same version (same lock file as check.sh).
    exec 9>"$CACHE/spire/.build-$SPIRE_VERSION.lock"
    flock 9
    # Another process may have built them while we waited for the lock.
    todo="$(missing)"
    if [[ -n "$todo" ]]; then
        tmp="$(mktemp -d "$CACHE/spire/.gobin.XXXXXX")"
        trap 'rm -rf "$tmp"' EXIT
        pkgs=()
        for t in $todo; do pkgs+=("github.com/spiffe/spire/cmd/$t"); done
        start=$(date +%s)
        log "building $todo $SPIRE_VERSION (first build downloads many modules; minutes on 2 cores)"
        if ! (cd "$TOOL_DIR" &&
              GOBIN="$tmp" GOMODCACHE="$CACHE/go/pkg/mod" GOCACHE="$CACHE/go-build" \
              GOFLAGS="-mod=readonly -buildvcs=false" go install "${pkgs[@]}") >&2; then
            die "go install ${pkgs[*]} failed (see the output above)"
        fi
        mkdir -p "$BIN_DIR"
        for t in $todo; do
            # Same filesystem: the rename is atomic, so no reader sees half a binary.
            mv -f "$tmp/$t" "$BIN_DIR/$t"
        done
        log "built $todo $SPIRE_VERSION in $(( $(date +%s) - start ))s -> $BIN_DIR"
    fi
    flock -u 9
fi

# A truncated or foreign binary fails here, with its name, rather than deep inside a test.
for t in "${TOOLS[@]}"; do
    v="$("$BIN_DIR/$t" --version 2>&1 | head -1 || true)"
    [[ "$v" == "${SPIRE_VERSION#v}"* ]] ||
        die "$BIN_DIR/$t --version printed '$v', expected ${SPIRE_VERSION#v}; delete it to rebuild"
done

echo "$BIN_DIR"
