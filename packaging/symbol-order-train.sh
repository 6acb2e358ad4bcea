#!/usr/bin/env bash
# packaging/symbol-order-train.sh: regenerates packaging/symbol-order.txt, the functions the agent
# runs while it starts and serves, which packaging/build-ordered.sh links first and together.
#
#   packaging/symbol-order-train.sh
#
# Builds spiffed (cargo profile dist, in CARGO_TARGET_DIR or target/; SPIFFED_BIN=PATH to use a
# binary named spiffed built elsewhere) and runs it under valgrind's callgrind in the situations the
# benchmarks measure, each with a first start and a restart on its own state, and in each a
# FetchX509SVID, FetchJWTSVID, ValidateJWTSVID, FetchX509Bundles/FetchJWTBundles and a health
# check by `spiffed api` from outside the profile:
#   - standalone (its own CA, one entry in its config);
#   - agent mode against a spire-server v1.13.3 on loopback (join token, one entry), the binary
#     from SPIRE_SERVER, or the cache of bench/agent-mode.sh or of the interop tests
#     (STANDALONE_ONLY=1 leaves agent mode out; the list then orders less of agent mode's code).
# Needs valgrind and binutils. Takes a few minutes; run it when the code the agent runs changed a
# lot (packaging/build-ordered.sh prints how much of the list it still finds).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
OUT="$HERE/symbol-order.txt"
SPIRE_VERSION=v1.13.3
STANDALONE_ONLY="${STANDALONE_ONLY:-0}"

log() { printf '== %s\n' "$*" >&2; }
die() {
    printf 'symbol-order-train.sh: %s\n' "$*" >&2
    exit 1
}

for tool in valgrind nm c++filt python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install valgrind binutils python3)"
done

if [[ -n "${SPIFFED_BIN:-}" ]]; then
    BIN="$(realpath "$SPIFFED_BIN")"
    [[ -x "$BIN" && "$(basename "$BIN")" == spiffed ]] || die "SPIFFED_BIN must name an executable called spiffed, not '$SPIFFED_BIN'"
else
    target="${CARGO_TARGET_DIR:-$ROOT/target}"
    log "cargo build --profile dist -p spiffed --bin spiffed (CARGO_TARGET_DIR=$target)"
    (cd "$ROOT" && env -u SPIFFED_SYMBOL_ORDERING_FILE CARGO_TARGET_DIR="$target" \
        cargo build --locked --profile dist -p spiffed --bin spiffed) || die "cargo build failed (output above)"
    BIN="$target/dist/spiffed"
fi

SPIRE_SERVER="${SPIRE_SERVER:-}"
if [[ "$STANDALONE_ONLY" != 1 && -z "$SPIRE_SERVER" ]]; then
    for c in "${SPIFFED_BENCH_CACHE:-$HOME/.cache/spiffed-bench}/spire/$SPIRE_VERSION/bin/spire-server" \
        "${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}/spire/$SPIRE_VERSION/bin/spire-server"; do
        if [[ -x "$c" ]]; then
            SPIRE_SERVER="$c"
            break
        fi
    done
    [[ -n "$SPIRE_SERVER" ]] || die "no spire-server $SPIRE_VERSION found: set SPIRE_SERVER, build it once with bench/agent-mode.sh, or STANDALONE_ONLY=1"
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/spiffed-order.XXXXXX")"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    [[ "${KEEP_TMP:-0}" == 1 ]] || rm -rf "$TMP"
}
trap cleanup EXIT
MY_UID="$(id -u)"
PROFILES=()

# profile NAME AGENT: spiffed run --config TMP/AGENT.toml (serving TMP/AGENT.sock) under
# callgrind into TMP/callgrind.NAME, the clients against it, then SIGTERM (callgrind writes its
# profile when the process exits). The same AGENT twice: a first start, then a restart on its state.
profile() {
    local name="$1" config="$TMP/$2.toml" sock="$TMP/$2.sock" out="$TMP/callgrind.$1" pid i token
    log "profiling: $name"
    rm -f "$sock"
    valgrind --tool=callgrind --demangle=no --callgrind-out-file="$out" \
        "$BIN" run --config "$config" >"$TMP/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    # The first X.509-SVID served is the readiness probe and the first FetchX509SVID.
    for ((i = 0; ; i++)); do
        if "$BIN" api fetch x509 --socket "$sock" >/dev/null 2>&1; then break; fi
        kill -0 "$pid" 2>/dev/null || die "spiffed exited under valgrind ($name; log: $(tail -n 5 "$TMP/$name.log"))"
        ((i < 600)) || die "spiffed served no X.509-SVID within 120 s under valgrind ($name)"
        sleep 0.2
    done
    token="$("$BIN" api fetch jwt --socket "$sock" --audience order-training --output json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["svids"][0]["token"])')" ||
        die "api fetch jwt failed ($name)"
    "$BIN" api validate jwt --socket "$sock" --audience order-training "$token" >/dev/null || die "api validate jwt failed ($name)"
    "$BIN" api fetch bundles --socket "$sock" >/dev/null || die "api fetch bundles failed ($name)"
    "$BIN" healthcheck --socket "$sock" >/dev/null || die "healthcheck failed ($name)"
    # Idle for a while, as the agent is between requests (timers, the sync loop).
    sleep 3
    kill -TERM "$pid"
    wait "$pid" || true
    [[ -s "$out" ]] || die "callgrind wrote no profile for $name (log: $TMP/$name.log)"
    PROFILES+=("$out")
}

# --------------------------------------------------------------------------------- standalone
mkdir -p "$TMP/standalone"
cat >"$TMP/standalone.toml" <<EOF
trust_domain = "example.org"
socket_path = "$TMP/standalone.sock"
admin_socket_path = "$TMP/standalone/admin.sock"
data_dir = "$TMP/standalone/data"

[[entries]]
spiffe_id = "spiffe://example.org/order/uid"
selectors = ["unix:uid:$MY_UID"]
EOF
profile standalone-first standalone
profile standalone-restart standalone

# --------------------------------------------------------------------------------- agent mode
if [[ "$STANDALONE_ONLY" != 1 ]]; then
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    mkdir -p "$TMP/spire/data" "$TMP/agent"
    cat >"$TMP/server.conf" <<EOF
server {
    bind_address = "127.0.0.1"
    bind_port = "$port"
    socket_path = "$TMP/spire/api.sock"
    trust_domain = "example.org"
    data_dir = "$TMP/spire/data"
    log_level = "WARN"
}
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "$TMP/spire/data/datastore.sqlite3"
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
}
EOF
    log "spire-server $SPIRE_SERVER on 127.0.0.1:$port"
    "$SPIRE_SERVER" run -config "$TMP/server.conf" </dev/null >"$TMP/spire-server.log" 2>&1 &
    PIDS+=("$!")
    for ((i = 0; ; i++)); do
        if "$SPIRE_SERVER" healthcheck -socketPath "$TMP/spire/api.sock" >/dev/null 2>&1; then break; fi
        ((i < 300)) || die "spire-server not healthy after 30 s (log: $TMP/spire-server.log)"
        sleep 0.1
    done
    spire() { "$SPIRE_SERVER" "$@" -socketPath "$TMP/spire/api.sock"; }
    spire bundle show >"$TMP/bootstrap.pem" || die "spire-server bundle show failed"
    token="$(spire token generate -ttl 3600 | sed -n 's/^Token: //p')"
    [[ -n "$token" ]] || die "spire-server token generate printed no token"
    spire entry create -parentID "spiffe://example.org/spire/agent/join_token/$token" \
        -spiffeID "spiffe://example.org/order/uid" -selector "unix:uid:$MY_UID" >/dev/null ||
        die "spire-server entry create failed"
    cat >"$TMP/agent.toml" <<EOF
trust_domain = "example.org"
socket_path = "$TMP/agent.sock"
admin_socket_path = "$TMP/agent/admin.sock"
data_dir = "$TMP/agent/data"

[spire_server]
address = "127.0.0.1:$port"
trust_bundle_path = "$TMP/bootstrap.pem"
join_token = "$token"
EOF
    profile agent-first agent
    profile agent-restart agent
fi

python3 "$HERE/symbol_order.py" names "$OUT" "${PROFILES[@]}"
log "wrote $OUT from ${#PROFILES[@]} profiles of $BIN"
