#!/usr/bin/env bash
# Interop checks: a real spiffed agent against foreign SPIFFE clients (go-spiffe, py-spiffe).
#
#   tests/interop/run.sh
#
# Installs the clients into a cache outside the checkout (${SPIFFED_INTEROP_CACHE:-~/.cache/
# spiffed-interop}), starts `$SPIFFED_BIN run` (default: target/debug/spiffed) on a temporary
# socket, runs every check with every client (the "no identity" ones as uid 65534 through
# setpriv, so run this as root, as CI does), prints a client x check matrix and exits 1 when any
# check failed. A missing toolchain fails the checks of its client; it is never skipped.
# With SPIFFED_INTEROP_SOCKET set, the checks run against an agent the caller started there
# instead (agent mode: the e2e test attaches spiffed to a real SPIRE Server); it must give this
# uid spiffe://example.org/interop with lifetimes of a few seconds. SPIFFED_INTEROP_AGENT_LOG
# names its log, SPIFFED_INTEROP_MODE labels it.
# See tests/interop/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}
SPIFFED_BIN=${SPIFFED_BIN:-$ROOT/target/debug/spiffed}
NOBODY_UID=65534
TRUST_DOMAIN=example.org
SPIFFE_ID=spiffe://$TRUST_DOMAIN/interop

CLIENTS=(go-spiffe py-spiffe spire-agent java-spiffe)
CHECKS=(x509 mtls jwt validate bundles rotation noidentity noidentity-jwt noidentity-bundles x509-write watch)
SPIRE_CHECKS=x509,x509-write,jwt,validate,watch,noidentity
JAVA_CHECKS=x509,jwt,noidentity
WITH_IDENTITY=x509,mtls,jwt,validate,bundles,rotation
WITHOUT_IDENTITY=noidentity,noidentity-jwt,noidentity-bundles

START=$(date +%s.%N)
declare -A RESULT=() REASON=() APPLIES=()

say() { printf 'interop: %s\n' "$*"; }
die() { printf 'interop: error: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1fs", e - s }'; }

# Marks every check in the comma-separated list $2 of client $1 failed with reason $3, unless
# it already has a result.
fail_checks() {
    local client=$1 reason=$3 check list
    IFS=, read -ra list <<<"$2"
    for check in "${list[@]}"; do
        APPLIES[$client/$check]=1
        if [[ -z ${RESULT[$client/$check]:-} ]]; then
            RESULT[$client/$check]=FAIL
            REASON[$client/$check]=$reason
        fi
    done
}

# run_checks CLIENT LABEL CHECKS CMD...: runs CMD (a checker printing "PASS name[: detail]" or
# "FAIL name: reason" lines), shows its output and records the result of each of CHECKS.
run_checks() {
    local client=$1 label=$2 checks=$3 out rc line name
    shift 3
    out=$(mktemp "$WORK/out.XXXXXX")
    rc=0
    (cd "$WORK" && timeout "${RUN_TIMEOUT:-60}" "$@") >"$out" 2>&1 || rc=$?
    sed "s/^/  [$label] /" "$out"
    while IFS= read -r line; do
        case $line in
            "PASS "*)
                name=${line#PASS }
                name=${name%%[: ]*}
                RESULT[$client/$name]=pass
                ;;
            "FAIL "*)
                name=${line#FAIL }
                name=${name%%[: ]*}
                RESULT[$client/$name]=FAIL
                REASON[$client/$name]=${line#FAIL "$name"}
                REASON[$client/$name]=${REASON[$client/$name]#: }
                ;;
        esac
    done <"$out"
    local why="no result from the checker (exit status $rc)"
    ((rc == 124)) && why="the checker timed out after ${RUN_TIMEOUT:-60} s"
    fail_checks "$client" "$checks" "$why"
}

# --- the agent binary and the workplace ---------------------------------------------------

[[ -x $SPIFFED_BIN ]] ||
    die "no spiffed binary at $SPIFFED_BIN: build it with 'cargo build -p spiffed' (from $ROOT) or set SPIFFED_BIN"
mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spiffed-interop.XXXXXX")
# uid $NOBODY_UID must reach the socket and the checker binaries in here.
chmod 0755 "$WORK"
AGENT_PID=
cleanup() {
    local rc=$?
    if [[ -n $AGENT_PID ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    if [[ -n ${SPIFFED_INTEROP_KEEP:-} ]]; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- clients: install into the cache, never into the checkout -----------------------------

# One setup at a time per cache (other checkouts may share it).
exec 9>"$CACHE/.setup.lock"
if command -v flock >/dev/null; then flock 9; fi

# Each setup runs in the background (they overlap on a cold cache) and leaves the reason it
# failed, if it did, in $WORK/<client>.setup-error.
setup_go() {
    if ! command -v go >/dev/null; then
        echo "go not found: install Go >= 1.24 (https://go.dev/doc/install, or your distribution's golang package) and put it on PATH" >"$WORK/go.setup-error"
        return
    fi
    local GOBIN=$CACHE/bin
    local log=$WORK/go-build.log
    if ! SPIFFED_INTEROP_CACHE=$CACHE "$HERE/go/build.sh" "$GOBIN" >"$log" 2>&1; then
        cat "$log" >&2
        echo "building tests/interop/go with $(go version 2>/dev/null | awk '{print $3}') failed (needs Go >= 1.24 and the Go module proxy): $(tail -n1 "$log")" >"$WORK/go.setup-error"
        return
    fi
    # Copied into the work dir so that uid $NOBODY_UID can run it.
    install -m 0755 "$GOBIN/interop-go" "$WORK/interop-go"
}

VENV=
if command -v python3 >/dev/null; then
    VENV=$CACHE/python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv
fi
setup_python() {
    if [[ -z $VENV ]]; then
        echo "python3 not found: install Python >= 3.9 with its venv module (Debian: apt-get install python3 python3-venv)" >"$WORK/py.setup-error"
        return
    fi
    local req stamp want log=$WORK/pip.log
    req=$HERE/python/requirements.txt
    stamp=$VENV/.requirements.sha256
    want=$(sha256sum "$req" | cut -d' ' -f1)
    if [[ $(cat "$stamp" 2>/dev/null) == "$want" ]] && "$VENV/bin/python" -c 'import spiffe' 2>/dev/null; then
        return
    fi
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >"$log" 2>&1; then
        cat "$log" >&2
        echo "python3 -m venv failed: install the venv module (Debian: apt-get install python3-venv)" >"$WORK/py.setup-error"
        return
    fi
    if ! PIP_CACHE_DIR=$CACHE/pip "$VENV/bin/pip" install --disable-pip-version-check -q \
        -r "$req" >"$log" 2>&1; then
        cat "$log" >&2
        echo "pip install -r tests/interop/python/requirements.txt failed (needs PyPI): $(tail -n1 "$log")" >"$WORK/py.setup-error"
        rm -rf "$VENV"
        return
    fi
    echo "$want" >"$stamp"
}

setup_go &
go_setup=$!
setup_python &
py_setup=$!
wait "$go_setup" || echo "Go setup ended with status $?" >>"$WORK/go.setup-error"
wait "$py_setup" || echo "Python setup ended with status $?" >>"$WORK/py.setup-error"
exec 9>&-
GO_ERR=$(cat "$WORK/go.setup-error" 2>/dev/null || true)
PY_ERR=$(cat "$WORK/py.setup-error" 2>/dev/null || true)
say "clients ready after $(elapsed)"

# Negative checks need a second uid that matches no entry.
NOBODY_ERR=
if ! command -v setpriv >/dev/null; then
    NOBODY_ERR="setpriv not found: install util-linux"
elif [[ $(id -u) != 0 ]]; then
    NOBODY_ERR="needs root to switch to uid $NOBODY_UID with setpriv (run as root, as CI does)"
fi
AS_NOBODY=(setpriv --reuid="$NOBODY_UID" --regid="$NOBODY_UID" --clear-groups)

# --- the agent ------------------------------------------------------------------------------

AGENT_LOG=$WORK/agent.log
if [[ -n ${SPIFFED_INTEROP_SOCKET:-} ]]; then
    # An agent the caller runs (agent mode: spiffed attached to a SPIRE Server, started by the
    # e2e test), with an entry for this uid giving $SPIFFE_ID and lifetimes of a few seconds.
    SOCKET=$SPIFFED_INTEROP_SOCKET
    AGENT_LOG=${SPIFFED_INTEROP_AGENT_LOG:-/dev/null}
    "$SPIFFED_BIN" healthcheck --socket "unix://$SOCKET" --timeout 5s >/dev/null 2>&1 ||
        die "no agent serving on SPIFFED_INTEROP_SOCKET=$SOCKET"
    say "spiffed (${SPIFFED_INTEROP_MODE:-run by the caller}) serving on $SOCKET"
else
SOCKET=$WORK/api.sock
cat >"$WORK/spiffed.toml" <<EOF
trust_domain = "$TRUST_DOMAIN"
socket_path = "$SOCKET"
admin_socket_path = "$WORK/admin/admin.sock"
data_dir = "$WORK/data"
x509_svid_ttl = "6s"
jwt_svid_ttl = "6s"
min_svid_ttl = "1s"
ca_ttl = "60s"
[[entries]]
spiffe_id = "$SPIFFE_ID"
selectors = ["unix:uid:$(id -u)"]
EOF
"$SPIFFED_BIN" run --config "$WORK/spiffed.toml" >"$AGENT_LOG" 2>&1 &
AGENT_PID=$!
for _ in $(seq 100); do
    kill -0 "$AGENT_PID" 2>/dev/null || { cat "$AGENT_LOG" >&2; die "spiffed exited at start-up"; }
    "$SPIFFED_BIN" healthcheck --socket "unix://$SOCKET" --timeout 1s >/dev/null 2>&1 && break
    sleep 0.1
done
"$SPIFFED_BIN" healthcheck --socket "unix://$SOCKET" --timeout 1s >/dev/null 2>&1 ||
    { cat "$AGENT_LOG" >&2; die "spiffed did not serve on $SOCKET within 10 s"; }
say "spiffed $("$SPIFFED_BIN" --version 2>/dev/null | awk '{print $NF}') serving on $SOCKET (pid $AGENT_PID) after $(elapsed)"
fi

# --- the checks -----------------------------------------------------------------------------

ADDR=unix://$SOCKET
GO_ARGS=(-socket "$ADDR" -expect-id "$SPIFFE_ID")
PY_ARGS=(--socket "$ADDR" --expect-id "$SPIFFE_ID")

say "go-spiffe $(awk '$1 == "github.com/spiffe/go-spiffe/v2" {print $2}' "$HERE/go/go.mod")"
if [[ -n $GO_ERR ]]; then
    fail_checks go-spiffe "$WITH_IDENTITY,$WITHOUT_IDENTITY" "$GO_ERR"
else
    run_checks go-spiffe "go uid $(id -u)" "$WITH_IDENTITY" \
        "$WORK/interop-go" "${GO_ARGS[@]}" -check "$WITH_IDENTITY"
    if [[ -n $NOBODY_ERR ]]; then
        fail_checks go-spiffe "$WITHOUT_IDENTITY" "$NOBODY_ERR"
    else
        run_checks go-spiffe "go uid $NOBODY_UID" "$WITHOUT_IDENTITY" \
            "${AS_NOBODY[@]}" "$WORK/interop-go" "${GO_ARGS[@]}" -check "$WITHOUT_IDENTITY"
    fi
fi

say "py-spiffe $(awk -F'==' '$1 == "spiffe" {print $2}' "$HERE/python/requirements.txt")"
if [[ -n $PY_ERR ]]; then
    fail_checks py-spiffe "$WITH_IDENTITY,$WITHOUT_IDENTITY" "$PY_ERR"
else
    run_checks py-spiffe "py uid $(id -u)" "$WITH_IDENTITY" \
        "$VENV/bin/python" "$HERE/python/check.py" "${PY_ARGS[@]}" --check "$WITH_IDENTITY"
    if [[ -n $NOBODY_ERR ]]; then
        fail_checks py-spiffe "$WITHOUT_IDENTITY" "$NOBODY_ERR"
    else
        # The interpreter and the venv live under the cache (typically in root's 0700 home):
        # CAP_DAC_READ_SEARCH lets uid $NOBODY_UID read them; attestation looks only at the uid,
        # gid and executable, so the caller still matches no entry.
        run_checks py-spiffe "py uid $NOBODY_UID" "$WITHOUT_IDENTITY" \
            "${AS_NOBODY[@]}" --inh-caps=+dac_read_search --ambient-caps=+dac_read_search \
            "$VENV/bin/python" "$HERE/python/check.py" "${PY_ARGS[@]}" --check "$WITHOUT_IDENTITY"
    fi
fi

# spire-agent's CLI (built once from the pinned SPIRE release and cached) and java-spiffe have
# their own checkers; the first build of each takes minutes, hence the longer time limit.
say "spire-agent $(awk '$1 == "github.com/spiffe/spire" {print $2}' "$HERE/spire/tool/go.mod")"
RUN_TIMEOUT=1500 run_checks spire-agent "spire" "$SPIRE_CHECKS" \
    bash "$HERE/spire/check.sh" "$SOCKET"
say "java-spiffe $(sed -n 's:.*<java-spiffe.version>\(.*\)</java-spiffe.version>.*:\1:p' "$HERE/java/pom.xml" | head -n 1)"
RUN_TIMEOUT=900 run_checks java-spiffe "java" "$JAVA_CHECKS" \
    bash "$HERE/java/check.sh" "$SOCKET"

# --- the matrix -----------------------------------------------------------------------------

passed=0 failed=0
echo
row=$(printf '%-11s' client)
for check in "${CHECKS[@]}"; do row+=$(printf ' %-*s' "${#check}" "$check"); done
echo "$row"
for client in "${CLIENTS[@]}"; do
    row=$(printf '%-11s' "$client")
    for check in "${CHECKS[@]}"; do
        if [[ -z ${APPLIES[$client/$check]:-} ]]; then
            row+=$(printf ' %-*s' "${#check}" "-")
            continue
        fi
        r=${RESULT[$client/$check]:-FAIL}
        if [[ $r == pass ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
        row+=$(printf ' %-*s' "${#check}" "$r")
    done
    echo "${row%"${row##*[! ]}"}"
done
if ((failed > 0)); then
    echo
    echo "failures (checks failing for the same reason grouped):"
    for client in "${CLIENTS[@]}"; do
        reasons=()
        declare -A group=()
        for check in "${CHECKS[@]}"; do
            [[ -z ${APPLIES[$client/$check]:-} ]] && continue
            [[ ${RESULT[$client/$check]:-FAIL} == pass ]] && continue
            reason=${REASON[$client/$check]:-no result}
            [[ -z ${group[$reason]:-} ]] && reasons+=("$reason")
            group[$reason]+=${group[$reason]:+,}$check
        done
        for reason in "${reasons[@]}"; do
            printf '  %s %s: %s\n' "$client" "${group[$reason]}" "$reason"
        done
        unset group
    done
    echo
    echo "agent log (last 15 lines):"
    tail -n 15 "$AGENT_LOG" | sed 's/^/  /'
fi
echo
say "finished in $(elapsed)"
echo "interop: $passed passed, $failed failed"
((failed == 0))
