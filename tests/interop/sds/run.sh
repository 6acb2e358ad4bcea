#!/usr/bin/env bash
# Side-by-side SDS check: the go-control-plane probe (main.go) against two SDS servers on their
# Workload API sockets, its normalised outputs compared line by line.
#
#   tests/interop/sds/run.sh build DIR
#       Builds the probe (Go module in this directory; toolchain caches in
#       ${SPIFFED_INTEROP_CACHE:-~/.cache/spiffed-interop}, as tests/interop/run.sh) and installs
#       it as DIR/sds-probe and DIR/sds-probe-rotate (the same program under a second path, so
#       that a `unix:path` selector can give the rotation phase a short-lived identity of its
#       own). Prints the two paths.
#   tests/interop/sds/run.sh compare DIR REFERENCE_LABEL REFERENCE_SOCKET LABEL SOCKET
#       Runs both phases of DIR/sds-probe* against both sockets (the two servers at the same
#       time), prints each output, then `diff -u REFERENCE OTHER`. Exits 0 when the outputs
#       are the same and both probes ran to their end, 1 otherwise. Its last line is
#       `sds: N passed, N failed` (one check per phase).
#
# What the servers must give the caller (uid running this): see README.md here.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}

say() { printf 'sds: %s\n' "$*"; }
die() { printf 'sds: error: %s\n' "$*" >&2; exit 2; }

build() {
    local dir=$1
    command -v go >/dev/null ||
        die "go not found: install Go >= 1.26 (https://go.dev/doc/install, or your distribution's golang package) and put it on PATH; the SDS probe is built with it"
    mkdir -p "$CACHE" "$dir"
    export GOPATH=$CACHE/go GOMODCACHE=$CACHE/go/pkg/mod GOCACHE=$CACHE/go-build
    # No VCS stamping: the checkout may belong to another user, or not be a git work tree.
    export GOFLAGS="-mod=readonly -buildvcs=false" GOWORK=off
    local log=$dir/go-build.log out=$CACHE/bin/sds-probe
    mkdir -p "$CACHE/bin"
    # One build at a time per cache (other checkouts may share it).
    if ! (
        exec 9>"$CACHE/.sds-probe.lock"
        if command -v flock >/dev/null; then flock 9; fi
        cd "$HERE" && go build -o "$out.tmp.$$" . && mv "$out.tmp.$$" "$out"
    ) >"$log" 2>&1; then
        cat "$log" >&2
        die "building tests/interop/sds with $(go version | awk '{print $3}') failed (needs Go >= 1.26 and the Go module proxy on a cold cache): $(tail -n 1 "$log")"
    fi
    install -m 0755 "$out" "$dir/sds-probe"
    install -m 0755 "$out" "$dir/sds-probe-rotate"
    echo "$dir/sds-probe"
    echo "$dir/sds-probe-rotate"
}

# run_probe DIR SOCKET OUT_PREFIX: both phases against one socket; each phase's stdout in
# OUT_PREFIX.PHASE, stderr in OUT_PREFIX.PHASE.err, exit status in OUT_PREFIX.PHASE.rc.
run_probe() {
    local dir=$1 sock=$2 out=$3 rc
    rc=0
    timeout 300 "$dir/sds-probe" -socket "$sock" -phase main >"$out.main" 2>"$out.main.err" || rc=$?
    echo "$rc" >"$out.main.rc"
    rc=0
    timeout 300 "$dir/sds-probe-rotate" -socket "$sock" -phase rotation >"$out.rotation" \
        2>"$out.rotation.err" || rc=$?
    echo "$rc" >"$out.rotation.rc"
}

compare() {
    local dir=$1 ref_label=$2 ref_sock=$3 label=$4 sock=$5
    [[ -x $dir/sds-probe && -x $dir/sds-probe-rotate ]] ||
        die "no probe in $dir: run '$0 build $dir' first"
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/spiffed-sds.XXXXXX")
    # An EXIT trap: the function's failing last command ends the script under `set -e`.
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    run_probe "$dir" "$ref_sock" "$work/ref" &
    local p1=$!
    run_probe "$dir" "$sock" "$work/other" &
    local p2=$!
    wait "$p1" || true
    wait "$p2" || true
    local passed=0 failed=0 phase
    for phase in main rotation; do
        local side
        for side in ref other; do
            local l=$ref_label
            [[ $side == other ]] && l=$label
            echo "----- $l, phase $phase (exit $(cat "$work/$side.$phase.rc"))"
            sed 's/^/  /' "$work/$side.$phase"
            if [[ -s $work/$side.$phase.err ]]; then
                echo "  (stderr)"
                sed 's/^/  | /' "$work/$side.$phase.err"
            fi
        done
        local why=()
        [[ $(cat "$work/ref.$phase.rc") == 0 ]] ||
            why+=("the probe did not run to its end against $ref_label (exit $(cat "$work/ref.$phase.rc"))")
        [[ $(cat "$work/other.$phase.rc") == 0 ]] ||
            why+=("the probe did not run to its end against $label (exit $(cat "$work/other.$phase.rc"))")
        echo "----- diff -u $ref_label $label, phase $phase"
        if diff -u --label "$ref_label" --label "$label" "$work/ref.$phase" "$work/other.$phase"; then
            echo "  (no difference)"
        else
            why+=("$label answers differently from $ref_label (the diff above)")
        fi
        if ((${#why[@]} == 0)); then
            say "PASS $phase"
            passed=$((passed + 1))
        else
            local w
            for w in "${why[@]}"; do say "FAIL $phase: $w"; done
            failed=$((failed + 1))
        fi
    done
    echo "sds: $passed passed, $failed failed"
    ((failed == 0))
}

case ${1:-} in
    build)
        [[ $# == 2 ]] || die "usage: $0 build DIR"
        build "$2"
        ;;
    compare)
        [[ $# == 6 ]] || die "usage: $0 compare DIR REFERENCE_LABEL REFERENCE_SOCKET LABEL SOCKET"
        compare "$2" "$3" "$4" "$5" "$6"
        ;;
    *)
        die "usage: $0 build DIR | compare DIR REFERENCE_LABEL REFERENCE_SOCKET LABEL SOCKET"
        ;;
esac
