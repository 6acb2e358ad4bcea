#!/usr/bin/env bash
# Builds the go-spiffe checker (tests/interop/go) as DIR/interop-go, with the interop cache
# (${SPIFFED_INTEROP_CACHE:-~/.cache/spiffed-interop}) for modules and builds: run.sh uses it,
# and so do the e2e tests that drive the checker themselves (federation across two agents).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}
if [[ $# != 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
if ! command -v go >/dev/null; then
    echo "go not found: install Go >= 1.24 (https://go.dev/doc/install, or your distribution's golang package) and put it on PATH" >&2
    exit 1
fi
mkdir -p "$CACHE" "$1"
export GOPATH=$CACHE/go GOMODCACHE=$CACHE/go/pkg/mod GOCACHE=$CACHE/go-build
# No VCS stamping: the checkout may belong to another user, or not be a git work tree.
export GOFLAGS="-mod=readonly -buildvcs=false" GOWORK=off
cd "$HERE"
go build -o "$1/interop-go" .
