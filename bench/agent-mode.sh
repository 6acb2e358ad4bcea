#!/usr/bin/env bash
# spiffed in agent mode (the node agent of a SPIRE Server, issue 12) measured against spire-agent
# and against spiffed standalone, on one spire-server v1.13.3, in one run.
#
#   bench/agent-mode.sh            the benchmark (about 25 minutes on 2 cores, plus the builds)
#   QUICK=1 bench/agent-mode.sh    a try-out: small sizes, a few minutes
#
# Builds (or finds cached) spire-server + spire-agent v1.13.3 as bench/compare-spire.sh does,
# builds spiffed (profile dist; PROFILE=release to change) and spiffed-loadgen (LOADGEN_PROFILE, loadgen; honours
# CARGO_TARGET_DIR), then in a temp dir starts spire-server and, attached to it, spire-agent and
# `spiffed run` with a [spire_server] block (agent mode), plus a standalone `spiffed run`, and
# measures (see bench/README.md, "Agent mode"):
#   1. start-up, idle RSS, cold fetches (c=16, c=1), warm FetchJWTSVID (c=16) and fan-out: the
#      same spiffed-loadgen scenarios against the three agents, alternating;
#   2. time from `spire-server entry create` to the workload's first SVID (a FetchX509SVID stream
#      held open, bench/wlapi.py await-id), for spire-agent and spiffed at the 5 s sync interval
#      and spiffed at SHORT_SYNC; spire-server's CPU per agent sync (each agent alone);
#   3. SYNC_ENTRIES entries parented to one node: agent start to every entry synced, agent RSS,
#      spire-server CPU; both agents;
#   4. spire-server down, agent restarted: spiffed's start to its first served SVID (from its
#      cache); spire-agent's fate (it never opens its socket and exits), bounded by DOWN_TIMEOUT.
# Raw JSON lines go to bench/results/agent-mode-<UTC>.jsonl; bench/render_agent_mode.py splices
# the "Agent mode" section into BENCHMARKS.md.
set -Eeuo pipefail

# `SECONDS` is a bash builtin (seconds since start): read the caller's value before it ticks.
if printenv SECONDS >/dev/null 2>&1; then
    ENV_SECONDS="$(printenv SECONDS)"
else
    ENV_SECONDS=""
fi
unset SECONDS

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SPIRE_VERSION=v1.13.3
TOOL_DIR="$HERE/spire/tool"
WLAPI=(python3 "$HERE/wlapi.py")
SCRIPT_START=$(date +%s)
INVOCATION="bench/agent-mode.sh${*:+ $*}"
KNOBS=(QUICK AGENT_MODE RUNS BENCH_SECONDS CONCURRENCY FANOUT_STREAMS FANOUT_CONNS FANOUT_TTL FANOUT_RUNS
    STARTUP_RUNS LATENCY_SAMPLES LATENCY_BLOCK AGENT_SYNC SHORT_SYNC CPU_WINDOW CPU_ROUNDS SYNC_ENTRIES SYNC_SETTLE SYNC_TIMEOUT
    DOWN_RUNS DOWN_TIMEOUT SERVER_CACHE_RELOAD PROFILE LOADGEN_PROFILE SPIFFED_BIN LOADGEN_BIN LOG_LEVEL KEEP_TMP CARGO_TARGET_DIR)
for v in "${KNOBS[@]}"; do
    if [[ -n "${!v+set}" ]]; then INVOCATION="$v=${!v} $INVOCATION"; fi
done
if [[ -n "$ENV_SECONDS" ]]; then INVOCATION="SECONDS=$ENV_SECONDS $INVOCATION"; fi

# ------------------------------------------------------------------------------------ knobs
QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
    d_runs=1 d_seconds=1 d_streams=1000 d_conns=10 d_ttl=20 d_fruns=1 d_startup=2 d_samples=5
    d_window=15 d_rounds=1 d_entries=1000 d_settle=5 d_down=2
else
    d_runs=3 d_seconds=5 d_streams=10000 d_conns=100 d_ttl=60 d_fruns=2 d_startup=3 d_samples=60
    d_window=40 d_rounds=2 d_entries=10000 d_settle=15 d_down=3
fi
# auto: measure agent mode when this spiffed has it (`spiffed run --help` lists --join-token).
AGENT_MODE="${AGENT_MODE:-auto}"
RUNS="${RUNS:-$d_runs}"
DURATION="${BENCH_SECONDS:-${ENV_SECONDS:-$d_seconds}}"
CONCURRENCY="${CONCURRENCY:-16}"
FANOUT_STREAMS="${FANOUT_STREAMS:-$d_streams}"
FANOUT_CONNS="${FANOUT_CONNS:-$d_conns}"
FANOUT_TTL="${FANOUT_TTL:-$d_ttl}"
FANOUT_RUNS="${FANOUT_RUNS:-$d_fruns}"
STARTUP_RUNS="${STARTUP_RUNS:-$d_startup}"
LATENCY_SAMPLES="${LATENCY_SAMPLES:-$d_samples}"
# The agents measured are restarted (back to back) before every LATENCY_BLOCK latency samples: a
# restart syncs at once, so each block draws a new phase of the agents' sync cycles against the
# server's cache reload, which otherwise drifts only slowly and would decide a whole run.
LATENCY_BLOCK="${LATENCY_BLOCK:-5}"
# spiffed's sync interval for everything but the short-interval runs: spire-agent's default.
AGENT_SYNC="${AGENT_SYNC:-5}"
SHORT_SYNC="${SHORT_SYNC:-1}"
CPU_WINDOW="${CPU_WINDOW:-$d_window}"
CPU_ROUNDS="${CPU_ROUNDS:-$d_rounds}"
SYNC_ENTRIES="${SYNC_ENTRIES:-$d_entries}"
SYNC_SETTLE="${SYNC_SETTLE:-$d_settle}"
SYNC_TIMEOUT="${SYNC_TIMEOUT:-600}"
DOWN_RUNS="${DOWN_RUNS:-$d_down}"
DOWN_TIMEOUT="${DOWN_TIMEOUT:-150}"
# spire-server's experimental.cache_reload_interval (seconds; empty: the server's default, 5 s).
SERVER_CACHE_RELOAD="${SERVER_CACHE_RELOAD:-}"
PROFILE="${PROFILE:-dist}"
LOADGEN_PROFILE="${LOADGEN_PROFILE:-loadgen}"
LOG_LEVEL="${LOG_LEVEL:-info}"
KEEP_TMP="${KEEP_TMP:-0}"
CACHE="${SPIFFED_BENCH_CACHE:-$HOME/.cache/spiffed-bench}"
INTEROP_CACHE="${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}"
RESULTS_DIR="${RESULTS_DIR:-$HERE/results}"
OUT_MD="${OUT_MD:-$ROOT/BENCHMARKS.md}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TRUST_DOMAIN=example.org

for v in RUNS CONCURRENCY FANOUT_STREAMS FANOUT_CONNS FANOUT_TTL FANOUT_RUNS STARTUP_RUNS LATENCY_SAMPLES LATENCY_BLOCK \
    AGENT_SYNC SHORT_SYNC CPU_WINDOW CPU_ROUNDS SYNC_ENTRIES SYNC_SETTLE SYNC_TIMEOUT DOWN_RUNS DOWN_TIMEOUT; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]] || [[ "${!v}" -lt 1 ]]; then
        echo "agent-mode.sh: $v must be a positive integer, got '${!v}'" >&2
        exit 2
    fi
done
if ! [[ "$DURATION" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "agent-mode.sh: SECONDS/BENCH_SECONDS must be a number, got '$DURATION'" >&2
    exit 2
fi
if [[ -n "$SERVER_CACHE_RELOAD" ]] && ! [[ "$SERVER_CACHE_RELOAD" =~ ^[0-9]+$ ]]; then
    echo "agent-mode.sh: SERVER_CACHE_RELOAD must be whole seconds, got '$SERVER_CACHE_RELOAD'" >&2
    exit 2
fi
case "$AGENT_MODE" in auto | 0 | 1) ;; *)
    echo "agent-mode.sh: AGENT_MODE must be auto, 0 or 1, got '$AGENT_MODE'" >&2
    exit 2
    ;;
esac
if ((SYNC_ENTRIES > 100000)); then
    echo "agent-mode.sh: SYNC_ENTRIES may be at most 100000" >&2
    exit 2
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "agent-mode.sh: note: not root; the entries use uid $(id -u) (the loadgen's and the probes')" >&2
fi
command -v python3 >/dev/null || { echo "agent-mode.sh: python3 not found (bench/wlapi.py and the renderer need it)" >&2; exit 2; }
command -v curl >/dev/null || { echo "agent-mode.sh: curl not found (it reads the Prometheus endpoints)" >&2; exit 2; }

# Fan-out opens thousands of descriptors: raise the soft limit for every child.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------------------------- helpers
# (copied from compare-spire.sh and scale.sh, which keep their own)
exec 5>&1 6>&2
TMP=""
FAILED_STEP=""
declare -A PIDS=()

log() { printf '[%s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - SCRIPT_START))" "$*" >&2; }
step() {
    FAILED_STEP="$*"
    log "== $*"
}
die() {
    log "ERROR: $*"
    exit 1
}

show_logs() {
    [[ -n "$TMP" && -d "$TMP/logs" ]] || return 0
    local f
    for f in "$TMP"/logs/*.log; do
        [[ -s "$f" ]] || continue
        echo "----- last 25 lines of $f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

alive() {
    local pid="$1" st
    [[ -r "/proc/$pid/stat" ]] || return 1
    st="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)" || return 1
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

# stop_proc NAME: SIGTERM (SIGCONT first, in case it is stopped), SIGKILL after 10 s.
stop_proc() {
    local name="$1" pid i
    pid="${PIDS[$name]:-}"
    [[ -n "$pid" ]] || return 0
    unset "PIDS[$name]"
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM for 10s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM ERR
    exec 1>&5 2>&6
    local name
    for name in "${!PIDS[@]}"; do
        stop_proc "$name"
    done
    if [[ $rc -ne 0 ]]; then
        log "FAILED (exit $rc)${FAILED_STEP:+ during: $FAILED_STEP}"
        show_logs
        if [[ -n "$TMP" && -d "$TMP" && "$KEEP_TMP" != 1 ]]; then
            local keep
            keep="$CACHE/failed-logs/agent-mode-$(date -u +%Y%m%dT%H%M%SZ)"
            { mkdir -p "$keep" && cp -r "$TMP/logs" "$TMP/conf" "$keep/" && gzip -r "$keep/logs"; } 2>/dev/null || true
            log "logs and configs copied to $keep (KEEP_TMP=1 keeps the whole temp dir)"
        fi
    fi
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        if [[ "$KEEP_TMP" == 1 ]]; then
            log "temp dir kept: $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

# fg_wait CMD...: runs CMD in the background and waits, so that a signal is handled at once.
fg_wait() {
    local rc=0
    "$@" &
    PIDS[fg]=$!
    wait "${PIDS[fg]}" || rc=$?
    unset "PIDS[fg]"
    return "$rc"
}

json_str() {
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    s="${s//$'\n'/\\n}"
    s="${s//$'\t'/\\t}"
    printf '"%s"' "$s"
}
emit() { printf '%s\n' "$1" >>"$RESULTS"; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo null; }
fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
CLK_TCK="$(getconf CLK_TCK 2>/dev/null || echo 100)"
# cpu_ms PID: utime + stime in ms (clock ticks: 10 ms resolution; includes exited threads).
cpu_ms() {
    local v
    v="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk -v t="$CLK_TCK" '{ printf "%d\n", ($12 + $13) * 1000 / t }')"
    echo "${v:-null}"
}
# cpu_ns PID: the threads' run time from /proc/PID/task/*/schedstat (ns; misses exited threads).
cpu_ns() {
    local s=0 v f
    for f in /proc/"$1"/task/*/schedstat; do
        read -r v _ <"$f" 2>/dev/null || continue
        s=$((s + v))
    done
    echo "$s"
}
now_us() {
    local t="${EPOCHREALTIME/./}"
    echo "$t"
}
us_to_ms() { awk -v a="$1" 'BEGIN{printf "%.1f", a/1000}'; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
emit_load() { emit "{\"type\":\"load\",\"phase\":$(json_str "$1"),\"loadavg\":$(json_str "$(loadavg)")}"; }

# ---------------------------------------------------------------- 1. SPIRE (cached build)
# An existing pair of binaries is used as is: SPIRE_SERVER/SPIRE_AGENT from the environment,
# else compare-spire.sh's cache (with its stamp), else the interop tests' cache; only when neither
# has both binaries are they built, into compare-spire.sh's cache, exactly as that script does.
GO_MODCACHE="${SPIFFED_BENCH_GOMODCACHE:-}"
if [[ -z "$GO_MODCACHE" ]]; then
    if [[ -d "$INTEROP_CACHE/go/pkg/mod" ]]; then GO_MODCACHE="$INTEROP_CACHE/go/pkg/mod"; else GO_MODCACHE="$CACHE/go/pkg/mod"; fi
fi
GO_BUILDCACHE="${SPIFFED_BENCH_GOCACHE:-}"
if [[ -z "$GO_BUILDCACHE" ]]; then
    if [[ -d "$INTEROP_CACHE/go-build" ]]; then GO_BUILDCACHE="$INTEROP_CACHE/go-build"; else GO_BUILDCACHE="$CACHE/go-build"; fi
fi
SPIRE_DIR="$CACHE/spire/$SPIRE_VERSION"
SPIRE_STAMP="$SPIRE_DIR/stamp"
SPIRE_SOURCE=""

spire_stamp_text() {
    printf 'spire %s\ngo.mod %s\ngo.sum %s\n' "$SPIRE_VERSION" \
        "$(sha256sum <"$TOOL_DIR/go.mod" | cut -d' ' -f1)" \
        "$(sha256sum <"$TOOL_DIR/go.sum" | cut -d' ' -f1)"
}

find_or_build_spire() {
    if [[ -n "${SPIRE_SERVER:-}" || -n "${SPIRE_AGENT:-}" ]]; then
        [[ -x "${SPIRE_SERVER:-}" && -x "${SPIRE_AGENT:-}" ]] ||
            die "SPIRE_SERVER and SPIRE_AGENT must both name executables (got '${SPIRE_SERVER:-}', '${SPIRE_AGENT:-}')"
        SPIRE_SOURCE="environment"
        return 0
    fi
    if ! grep -q "github.com/spiffe/spire $SPIRE_VERSION" "$TOOL_DIR/go.mod"; then
        die "$TOOL_DIR/go.mod does not pin github.com/spiffe/spire $SPIRE_VERSION"
    fi
    SPIRE_SERVER="$SPIRE_DIR/bin/spire-server"
    SPIRE_AGENT="$SPIRE_DIR/bin/spire-agent"
    if [[ -x "$SPIRE_SERVER" && -x "$SPIRE_AGENT" && -f "$SPIRE_STAMP" ]] &&
        [[ "$(cat "$SPIRE_STAMP")" == "$(spire_stamp_text)" ]]; then
        SPIRE_SOURCE="$SPIRE_DIR/bin (compare-spire.sh's cache)"
        return 0
    fi
    local ib="$INTEROP_CACHE/spire/$SPIRE_VERSION/bin"
    if [[ -x "$ib/spire-server" && -x "$ib/spire-agent" ]]; then
        SPIRE_SERVER="$ib/spire-server"
        SPIRE_AGENT="$ib/spire-agent"
        SPIRE_SOURCE="$ib (the interop tests' cache)"
        return 0
    fi
    command -v go >/dev/null || die "go not found: it is needed once to build SPIRE $SPIRE_VERSION"
    mkdir -p "$SPIRE_DIR" "$GO_MODCACHE" "$GO_BUILDCACHE"
    exec 8>"$SPIRE_DIR/.build.lock"
    flock 8
    if [[ -x "$SPIRE_SERVER" && -x "$SPIRE_AGENT" && -f "$SPIRE_STAMP" ]] &&
        [[ "$(cat "$SPIRE_STAMP")" == "$(spire_stamp_text)" ]]; then
        flock -u 8
        SPIRE_SOURCE="$SPIRE_DIR/bin (built by a concurrent run)"
        return 0
    fi
    local tmpbin start blog
    tmpbin="$(mktemp -d "$SPIRE_DIR/.gobin.XXXXXX")"
    blog="$SPIRE_DIR/build.log"
    start=$(date +%s)
    log "building spire-server + spire-agent $SPIRE_VERSION (GOMODCACHE=$GO_MODCACHE GOCACHE=$GO_BUILDCACHE; log: $blog)"
    if ! (cd "$TOOL_DIR" &&
        GOBIN="$tmpbin" GOMODCACHE="$GO_MODCACHE" GOCACHE="$GO_BUILDCACHE" \
            GOFLAGS="-mod=readonly -buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-local}" \
            go install github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent) \
        >"$blog" 2>&1; then
        tail -n 30 "$blog" >&2
        rm -rf "$tmpbin"
        flock -u 8
        die "building SPIRE $SPIRE_VERSION failed (full log: $blog)"
    fi
    mkdir -p "$SPIRE_DIR/bin"
    mv -f "$tmpbin/spire-server" "$SPIRE_SERVER"
    mv -f "$tmpbin/spire-agent" "$SPIRE_AGENT"
    rm -rf "$tmpbin"
    spire_stamp_text >"$SPIRE_STAMP"
    flock -u 8
    SPIRE_SOURCE="$SPIRE_DIR/bin (built now in $(($(date +%s) - start))s)"
}

step "SPIRE $SPIRE_VERSION"
find_or_build_spire
log "spire-server + spire-agent: $SPIRE_SOURCE"

# ------------------------------------------------------------ 2. spiffed (profile $PROFILE)
# SPIFFED_BIN + LOADGEN_BIN: measure binaries built elsewhere (e.g. another branch) and skip cargo.
if [[ -n "${SPIFFED_BIN:-}" || -n "${LOADGEN_BIN:-}" ]]; then
    step "prebuilt binaries: SPIFFED_BIN=${SPIFFED_BIN:-} LOADGEN_BIN=${LOADGEN_BIN:-}"
    [[ -x "${SPIFFED_BIN:-}" && -x "${LOADGEN_BIN:-}" ]] || die "SPIFFED_BIN and LOADGEN_BIN must both name executables"
    SPIFFED="$(realpath "$SPIFFED_BIN")"
    LOADGEN="$(realpath "$LOADGEN_BIN")"
    PROFILE="prebuilt"
else
    # The load generator is the measuring tool, not the product: it is built with
    # LOADGEN_PROFILE (default `loadgen`: fat LTO, opt-level 3 throughout), so that the product
    # profile's size optimisations (dist) never slow the client down.
    step "packaging/build-ordered.sh $PROFILE (spiffed, its functions in link order); cargo build --profile $LOADGEN_PROFILE -p spiffed-loadgen (CARGO_TARGET_DIR=$TARGET_DIR)"
    command -v cargo >/dev/null || die "cargo not found"
    if ! CARGO_TARGET_DIR="$TARGET_DIR" "$ROOT/packaging/build-ordered.sh" "$PROFILE" >/dev/null; then
        die "packaging/build-ordered.sh $PROFILE failed (output above)"
    fi
    if ! (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --profile "$LOADGEN_PROFILE" -p spiffed-loadgen); then
        die "cargo build --profile $LOADGEN_PROFILE -p spiffed-loadgen failed (output above)"
    fi
    # cargo's `dev` profile builds into target/debug.
    pdir="$PROFILE"
    if [[ "$PROFILE" == dev ]]; then pdir=debug; fi
    ldir="$LOADGEN_PROFILE"
    if [[ "$LOADGEN_PROFILE" == dev ]]; then ldir=debug; fi
    SPIFFED="$(realpath "$TARGET_DIR/$pdir/spiffed")"
    LOADGEN="$(realpath "$TARGET_DIR/$ldir/spiffed-loadgen")"
fi
[[ -x "$SPIFFED" && -x "$LOADGEN" ]] || die "no $SPIFFED or $LOADGEN after the build"

# auto: try agent mode when `spiffed run --help` lists --join-token, and carry on without it if
# the agent does not serve (recorded, and said in the section); 1: a failure stops the script.
AGENT_MODE_ASKED="$AGENT_MODE"
if [[ "$AGENT_MODE" == auto ]]; then
    if "$SPIFFED" run --help 2>/dev/null | grep -q -- '--join-token'; then AGENT_MODE=1; else AGENT_MODE=0; fi
fi
if [[ "$AGENT_MODE" == 1 ]]; then
    log "agent mode: measured"
else
    log "agent mode: NOT measured (this spiffed has no agent mode: \`spiffed run --help\` lists no --join-token;" \
        "AGENT_MODE=1 forces it). spire-agent and spiffed standalone are measured."
fi

# ---------------------------------------------------------------- 3. temp dir, spire-server
step "temp dir"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/spiffed-am.XXXXXX")"
chmod 755 "$TMP"
mkdir -p "$TMP/logs" "$TMP/conf" "$TMP/out" "$TMP/spire/server/data" "$TMP/spire/agent/data" \
    "$TMP/standalone" "$TMP/agentmode"
mkdir -p "$RESULTS_DIR"
STAMP_UTC="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS="$RESULTS_DIR/agent-mode-$STAMP_UTC.jsonl"
: >"$RESULTS"
log "temp dir $TMP; results -> $RESULTS"

MY_UID="$(id -u)"
ID_UID="spiffe://$TRUST_DOMAIN/bench/uid"
ID_FANOUT="spiffe://$TRUST_DOMAIN/bench/fanout"
SERVER_SOCK="$TMP/spire/server/api.sock"
declare -A SOCK=([spire-agent]="$TMP/spire/agent/api.sock" [standalone]="$TMP/standalone/api.sock"
    [agent-mode]="$TMP/agentmode/api.sock")
AM_ADMIN_SOCK="$TMP/agentmode/admin/admin.sock"
# The agents attached to spire-server (agent mode only when measured) and all three.
SERVER_AGENTS=(spire-agent)
ALL_AGENTS=(standalone spire-agent)
if [[ "$AGENT_MODE" == 1 ]]; then
    SERVER_AGENTS=(agent-mode spire-agent)
    ALL_AGENTS=(agent-mode standalone spire-agent)
fi

SPIRE_PORT="$("${WLAPI[@]}" freeport)"
SERVER_PROM_PORT="$("${WLAPI[@]}" freeport)"
AGENT_PROM_PORT="$("${WLAPI[@]}" freeport)"
experimental=""
if [[ -n "$SERVER_CACHE_RELOAD" ]]; then
    experimental="    experimental {
        cache_reload_interval = \"${SERVER_CACHE_RELOAD}s\"
    }"
fi
cat >"$TMP/conf/server.conf" <<EOF
server {
    bind_address = "127.0.0.1"
    bind_port = "$SPIRE_PORT"
    socket_path = "$SERVER_SOCK"
    trust_domain = "$TRUST_DOMAIN"
    data_dir = "$TMP/spire/server/data"
    log_level = "${LOG_LEVEL^^}"
    default_x509_svid_ttl = "1h"
    ca_ttl = "24h"
$experimental
}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "$TMP/spire/server/data/datastore.sqlite3"
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
}

# Read by the script: RPC counts (syncs per window) from spire-server's own counters.
telemetry {
    Prometheus {
        host = "127.0.0.1"
        port = $SERVER_PROM_PORT
    }
}
EOF

cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
mem_kib="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
git_commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git_branch="$(git -C "$ROOT" rev-parse --abbrev-ref HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then git_dirty=true; else git_dirty=false; fi
emit "{\"type\":\"meta\",\"utc\":$(json_str "$STAMP_UTC"),\"invocation\":$(json_str "$INVOCATION")\
,\"agent_mode\":$([[ "$AGENT_MODE" == 1 ]] && echo true || echo false)\
,\"knobs\":{\"QUICK\":$(json_str "$QUICK"),\"RUNS\":$RUNS,\"SECONDS\":$DURATION,\"CONCURRENCY\":$CONCURRENCY\
,\"FANOUT_STREAMS\":$FANOUT_STREAMS,\"FANOUT_CONNS\":$FANOUT_CONNS,\"FANOUT_TTL\":$FANOUT_TTL,\"FANOUT_RUNS\":$FANOUT_RUNS\
,\"STARTUP_RUNS\":$STARTUP_RUNS,\"LATENCY_SAMPLES\":$LATENCY_SAMPLES,\"LATENCY_BLOCK\":$LATENCY_BLOCK,\"AGENT_SYNC\":$AGENT_SYNC,\"SHORT_SYNC\":$SHORT_SYNC\
,\"CPU_WINDOW\":$CPU_WINDOW,\"CPU_ROUNDS\":$CPU_ROUNDS,\"SYNC_ENTRIES\":$SYNC_ENTRIES,\"SYNC_SETTLE\":$SYNC_SETTLE,\"SYNC_TIMEOUT\":$SYNC_TIMEOUT\
,\"DOWN_RUNS\":$DOWN_RUNS,\"DOWN_TIMEOUT\":$DOWN_TIMEOUT,\"SERVER_CACHE_RELOAD\":$(json_str "$SERVER_CACHE_RELOAD")\
,\"PROFILE\":$(json_str "$PROFILE"),\"LOADGEN_PROFILE\":$(json_str "$LOADGEN_PROFILE"),\"LOG_LEVEL\":$(json_str "$LOG_LEVEL")}\
,\"machine\":{\"nproc\":$(nproc),\"cpu\":$(json_str "$cpu_model"),\"kernel\":$(json_str "$(uname -r)"),\"mem_kib\":${mem_kib:-null}\
,\"loadavg_start\":$(json_str "$(loadavg)")}\
,\"versions\":{\"spiffed_commit\":$(json_str "$git_commit"),\"branch\":$(json_str "$git_branch"),\"spiffed_dirty\":$git_dirty\
,\"rustc\":$(json_str "$(rustc --version 2>/dev/null || echo unknown)"),\"spire\":$(json_str "$SPIRE_VERSION")\
,\"spire_agent_version\":$(json_str "$("$SPIRE_AGENT" --version 2>&1 | head -1)"),\"spire_source\":$(json_str "$SPIRE_SOURCE")\
,\"python\":$(json_str "$(python3 --version 2>&1)")\
,\"spiffed_bin\":$(json_str "$SPIFFED"),\"spiffed_version\":$(json_str "$("$SPIFFED" --version 2>&1 | head -1)")}\
,\"uid\":$MY_UID,\"clk_tck\":$CLK_TCK,\"nofile_limit\":$(json_str "$(ulimit -n)")}"

step "spire-server"
emit_load "start"
"$SPIRE_SERVER" run -config "$TMP/conf/server.conf" </dev/null >>"$TMP/logs/spire-server.log" 2>&1 &
PIDS[spire-server]=$!
spire_cli() { "$SPIRE_SERVER" "$@" -socketPath "$SERVER_SOCK"; }
for ((i = 0; ; i++)); do
    if "$SPIRE_SERVER" healthcheck -socketPath "$SERVER_SOCK" >/dev/null 2>&1; then break; fi
    alive "${PIDS[spire-server]}" || die "spire-server exited (log: $TMP/logs/spire-server.log)"
    ((i < 300)) || die "spire-server not healthy after 30s (log: $TMP/logs/spire-server.log)"
    sleep 0.1
done
spire_cli bundle show >"$TMP/conf/bootstrap.pem" || die "spire-server bundle show failed"
new_token() {
    local t
    t="$(spire_cli token generate -ttl 86400 | sed -n 's/^Token: //p')"
    [[ -n "$t" ]] || die "spire-server token generate printed no token"
    echo "$t"
}
TOKEN_SPIRE="$(new_token)"
TOKEN_AM="$(new_token)"
declare -A PARENT=([spire-agent]="spiffe://$TRUST_DOMAIN/spire/agent/join_token/$TOKEN_SPIRE"
    [agent-mode]="spiffe://$TRUST_DOMAIN/spire/agent/join_token/$TOKEN_AM")

# spire_entry AGENT ENTRY_ID SPIFFE_ID [extra args...]: an entry under that agent's node.
spire_entry() {
    local agent="$1" eid="$2" sid="$3"
    shift 3
    spire_cli entry create -entryID "$eid" -parentID "${PARENT[$agent]}" -spiffeID "$sid" "$@" \
        >>"$TMP/logs/spire-entries.log" 2>&1 ||
        die "spire-server entry create -entryID $eid failed (log: $TMP/logs/spire-entries.log)"
}
spire_entry_delete() {
    spire_cli entry delete -entryID "$1" >>"$TMP/logs/spire-entries.log" 2>&1 ||
        die "spire-server entry delete -entryID $1 failed (log: $TMP/logs/spire-entries.log)"
}

SERVER_PROM="http://127.0.0.1:$SERVER_PROM_PORT/metrics"
AGENT_PROM="http://127.0.0.1:$AGENT_PROM_PORT/metrics"
# The server RPCs an agent's sync makes (and the minting ones), as counted by spire-server.
server_counts() {
    local body
    body="$(curl -s -m 2 "$SERVER_PROM" 2>/dev/null || true)"
    awk '
        function add(k) { c[k] += $NF }
        /^spire_server_rpc_entry_v1_entry_sync_authorized_entries[{ ]/ { add("sync") }
        /^spire_server_rpc_entry_v1_entry_get_authorized_entries[{ ]/ { add("get_entries") }
        /^spire_server_rpc_bundle_v1_bundle_get_bundle[{ ]/ { add("get_bundle") }
        /^spire_server_rpc_svid_v1_svid_batch_new_x509_svid[{ ]/ { add("batch_new_x509") }
        /^spire_server_rpc_svid_v1_svid_new_jwtsvid[{ ]/ { add("new_jwt") }
        /^spire_server_rpc_agent_v1_agent_renew_agent[{ ]/ { add("renew_agent") }
        /^spire_server_entry_cache_reload[{ ]/ { add("cache_reload") }
        END {
            printf "{\"sync\":%d,\"get_entries\":%d,\"get_bundle\":%d,\"batch_new_x509\":%d,\"new_jwt\":%d,\"renew_agent\":%d,\"cache_reload\":%d}\n",
                c["sync"], c["get_entries"], c["get_bundle"], c["batch_new_x509"], c["new_jwt"], c["renew_agent"], c["cache_reload"]
        }' <<<"$body"
}

# ------------------------------------------------------------------------------ the agents
# write_spire_agent_conf [PROMETHEUS(0|1)]
write_spire_agent_conf() {
    local telemetry=""
    if [[ "${1:-0}" == 1 ]]; then
        telemetry="
# Read by the script: lru_cache_record_map_size, the entries in the agent's cache.
telemetry {
    Prometheus {
        host = \"127.0.0.1\"
        port = $AGENT_PROM_PORT
    }
}"
    fi
    cat >"$TMP/conf/agent.conf" <<EOF
agent {
    data_dir = "$TMP/spire/agent/data"
    log_level = "${LOG_LEVEL^^}"
    server_address = "127.0.0.1"
    server_port = "$SPIRE_PORT"
    socket_path = "${SOCK[spire-agent]}"
    trust_bundle_path = "$TMP/conf/bootstrap.pem"
    trust_domain = "$TRUST_DOMAIN"
    join_token = "$TOKEN_SPIRE"
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    # "disk", not "memory": with an in-memory key the agent cannot reuse its SVID after a
    # restart and would need a new join token.
    KeyManager "disk" {
        plugin_data {
            directory = "$TMP/spire/agent/data"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {
            discover_workload_path = false
        }
    }
}
$telemetry
EOF
}

# write_standalone_conf SET(uid|fanout)
write_standalone_conf() {
    local entries
    case "$1" in
    uid) entries="[[entries]]
spiffe_id = \"$ID_UID\"
selectors = [\"unix:uid:$MY_UID\"]" ;;
    fanout) entries="[[entries]]
spiffe_id = \"$ID_FANOUT\"
selectors = [\"unix:uid:$MY_UID\"]
x509_svid_ttl = \"${FANOUT_TTL}s\"" ;;
    *) die "write_standalone_conf: unknown set $1" ;;
    esac
    cat >"$TMP/conf/standalone.toml" <<EOF
trust_domain = "$TRUST_DOMAIN"
socket_path = "${SOCK[standalone]}"
admin_socket_path = "$TMP/standalone/admin/admin.sock"
data_dir = "$TMP/standalone/data"
log_level = "$LOG_LEVEL"

$entries
EOF
}

# write_agent_mode_conf SYNC_SECONDS: the public contract of issue 12 (nothing else set).
write_agent_mode_conf() {
    cat >"$TMP/conf/agent-mode.toml" <<EOF
trust_domain = "$TRUST_DOMAIN"
socket_path = "${SOCK[agent-mode]}"
admin_socket_path = "$AM_ADMIN_SOCK"
data_dir = "$TMP/agentmode/data"
log_level = "$LOG_LEVEL"

[spire_server]
address = "127.0.0.1:$SPIRE_PORT"
trust_bundle_path = "$TMP/conf/bootstrap.pem"
join_token = "$TOKEN_AM"
sync_interval = "${1}s"
EOF
}

agent_cmd() {
    case "$1" in
    spire-agent) AGENT_CMD=("$SPIRE_AGENT" run -config "$TMP/conf/agent.conf") ;;
    standalone) AGENT_CMD=("$SPIFFED" run --config "$TMP/conf/standalone.toml") ;;
    agent-mode) AGENT_CMD=("$SPIFFED" run --config "$TMP/conf/agent-mode.toml") ;;
    *) die "unknown agent $1" ;;
    esac
}

# start_agent_try NAME TIMEOUT: spawns the agent stopped before exec; wlapi.py starts the clock,
# resumes it and polls its socket every 1 ms until a FetchX509SVID message arrives. Sets
# START_OUT (wlapi's JSON line) and START_MS; returns wlapi's status. Not in $(...): PIDS must be
# set in this shell.
START_OUT=""
START_MS=""
start_agent_try() {
    local name="$1" timeout="$2" rc=0
    agent_cmd "$name"
    rm -f "${SOCK[$name]}"
    (
        kill -STOP "$BASHPID"
        exec "${AGENT_CMD[@]}" </dev/null >>"$TMP/logs/$name.log" 2>&1
    ) &
    PIDS[$name]=$!
    START_OUT="$("${WLAPI[@]}" startup --pid "${PIDS[$name]}" --socket "${SOCK[$name]}" --timeout "$timeout")" || rc=$?
    [[ "$START_OUT" == \{* ]] || START_OUT="{\"ok\": false, \"error\": $(json_str "wlapi.py startup printed: $START_OUT")}"
    START_MS="$(sed -n 's/.*"first_svid_ms": \([0-9.]*\).*/\1/p' <<<"$START_OUT")"
    return "$rc"
}
start_agent() {
    if ! start_agent_try "$1" 90; then
        log "$1 did not serve an SVID: $START_OUT"
        die "$1 failed to start (log: $TMP/logs/$1.log)"
    fi
}

# wait_probe SOCKET ARGS...: wlapi.py wait; exits on failure.
wait_probe() {
    local sock="$1" out
    shift
    out="$("${WLAPI[@]}" wait "$sock" "$@")" || die "waiting on $sock ($*) failed: $out"
}

record_idle() {
    local label="$1" name pid
    for name in agent-mode standalone spire-agent spire-server; do
        pid="${PIDS[$name]:-}"
        [[ -n "$pid" ]] || continue
        emit "{\"type\":\"idle\",\"label\":$(json_str "$label"),\"agent\":\"$name\",\"pid\":$pid\
,\"rss_kib\":$(rss_kib "$pid"),\"fds\":$(fd_count "$pid")}"
    done
}

# loadgen AGENT CASE RUN ARGS...: runs the loadgen, appends its JSON lines (wrapped); a failed
# run is recorded as a failure, never aborts the script.
loadgen() {
    local agent="$1" case="$2" run="$3"
    shift 3
    local out="$TMP/out/lg.out" err="$TMP/out/lg.err" rc=0 line n=0
    local cmdline="spiffed-loadgen $*"
    log "  $case run $run: $agent"
    fg_wait "$LOADGEN" "$@" >"$out" 2>"$err" || rc=$?
    sed 's/^/    /' "$err" >&2
    while IFS= read -r line; do
        [[ "$line" == \{* ]] || continue
        n=$((n + 1))
        emit "{\"type\":\"result\",\"agent\":\"$agent\",\"case\":\"$case\",\"run\":$run,\"rc\":$rc\
,\"cmd\":$(json_str "$cmdline"),\"result\":$line}"
    done <"$out"
    if [[ $rc -ne 0 || $n -eq 0 ]]; then
        log "  $agent $case run $run failed (exit $rc); recorded"
        emit "{\"type\":\"failure\",\"agent\":\"$agent\",\"case\":\"$case\",\"run\":$run,\"rc\":$rc\
,\"cmd\":$(json_str "$cmdline"),\"stderr\":$(json_str "$(tail -n 5 "$err")")}"
    fi
}

# healthcheck_json AGENT LABEL: records `spiffed healthcheck --output json` (agent mode's readiness).
healthcheck_json() {
    local out compact rc=0
    out="$("$SPIFFED" healthcheck --output json --socket "${SOCK[$1]}" 2>&1)" || rc=$?
    if compact="$(python3 -c 'import json,sys; print(json.dumps(json.loads(sys.stdin.read())))' <<<"$out" 2>/dev/null)"; then
        emit "{\"type\":\"healthcheck\",\"agent\":\"$1\",\"label\":$(json_str "$2"),\"rc\":$rc,\"result\":$compact}"
    else
        emit "{\"type\":\"healthcheck\",\"agent\":\"$1\",\"label\":$(json_str "$2"),\"rc\":$rc,\"text\":$(json_str "$out")}"
    fi
    log "  $1 healthcheck ($2): $(tr -d '\n' <<<"$out" | cut -c1-200)"
}

step "entries for both nodes: unix:uid:$MY_UID -> $ID_UID"
for a in "${SERVER_AGENTS[@]}"; do
    spire_entry "$a" "am-uid-$a" "$ID_UID" -selector "unix:uid:$MY_UID"
done

step "spire-agent (join token, trust_bundle_path from spire-server bundle show)"
write_spire_agent_conf 0
start_agent spire-agent
log "spire-agent serves: $START_MS ms after spawn (node attestation + first sync)"
emit "{\"type\":\"startup_first\",\"agent\":\"spire-agent\",\"result\":$START_OUT}"
wait_probe "${SOCK[spire-agent]}" --expect-id "$ID_UID" --timeout 60

step "spiffed standalone (entry unix:uid:$MY_UID in its config)"
write_standalone_conf uid
start_agent standalone
emit "{\"type\":\"startup_first\",\"agent\":\"standalone\",\"result\":$START_OUT}"
wait_probe "${SOCK[standalone]}" --expect-id "$ID_UID" --timeout 10

if [[ "$AGENT_MODE" == 1 ]]; then
    step "spiffed agent mode (join token, sync_interval ${AGENT_SYNC}s)"
    write_agent_mode_conf "$AGENT_SYNC"
    if start_agent_try agent-mode 90 &&
        "${WLAPI[@]}" wait "${SOCK[agent-mode]}" --expect-id "$ID_UID" --timeout 60 >"$TMP/out/am-wait.out"; then
        log "spiffed agent mode serves: $START_MS ms after spawn (node attestation + first sync)"
        emit "{\"type\":\"startup_first\",\"agent\":\"agent-mode\",\"result\":$START_OUT}"
        healthcheck_json agent-mode "server up"
    elif [[ "$AGENT_MODE_ASKED" == 1 ]]; then
        log "spiffed agent mode did not serve $ID_UID: $START_OUT $(cat "$TMP/out/am-wait.out" 2>/dev/null)"
        die "spiffed agent mode failed to start (log: $TMP/logs/agent-mode.log)"
    else
        log "spiffed agent mode did not serve $ID_UID: $START_OUT; going on without it (AGENT_MODE=1 makes this fatal)"
        tail -n 15 "$TMP/logs/agent-mode.log" >&2 || true
        emit "{\"type\":\"agent_mode_unavailable\",\"result\":$START_OUT\
,\"log_tail\":$(json_str "$(tail -n 15 "$TMP/logs/agent-mode.log" 2>/dev/null | cut -c1-400)")}"
        stop_proc agent-mode
        spire_entry_delete "am-uid-agent-mode"
        AGENT_MODE=0
        SERVER_AGENTS=(spire-agent)
        ALL_AGENTS=(standalone spire-agent)
    fi
fi

# ------------------------------------------------------------ 1a. start-up and idle RSS
step "1a. start-up with existing state, server up ($STARTUP_RUNS restarts each) and idle RSS"
emit_load "1a"
for ((r = 1; r <= STARTUP_RUNS; r++)); do
    for name in "${ALL_AGENTS[@]}"; do
        stop_proc "$name"
        start_agent "$name"
        log "  $name restart $r: first SVID after $START_MS ms"
        emit "{\"type\":\"startup\",\"agent\":\"$name\",\"run\":$r,\"result\":$START_OUT}"
    done
    # Idle: 2 s after the last start-up probe, no client connected.
    sleep 2
    record_idle "after restart $r"
done

# ------------------------------------------------------------ 1b. cold and warm
step "1b. cold (c=$CONCURRENCY, c=1) and warm FetchJWTSVID (c=$CONCURRENCY), $RUNS run(s) x ${DURATION}s, alternating"
emit_load "1b"
for ((r = 1; r <= RUNS; r++)); do
    for c in cold cold_c1 warm_jwt; do
        for agent in "${ALL_AGENTS[@]}"; do
            sock="${SOCK[$agent]}"
            case "$c" in
            cold) loadgen "$agent" "$c" "$r" cold --socket "$sock" --concurrency "$CONCURRENCY" --seconds "$DURATION" --allow-errors ;;
            cold_c1) loadgen "$agent" "$c" "$r" cold --socket "$sock" --concurrency 1 --seconds "$DURATION" --allow-errors ;;
            warm_jwt) loadgen "$agent" "$c" "$r" warm --rpc jwt --socket "$sock" --concurrency "$CONCURRENCY" --seconds "$DURATION" --allow-errors ;;
            esac
        done
    done
done

# ------------------------------------------------------------ 1c. fan-out (short SVID TTL)
step "1c. fan-out: $FANOUT_STREAMS streams on $FANOUT_CONNS connections, X.509-SVID TTL ${FANOUT_TTL}s"
emit_load "1c"
for a in "${SERVER_AGENTS[@]}"; do
    spire_entry_delete "am-uid-$a"
    spire_entry "$a" "am-fanout-$a" "$ID_FANOUT" -selector "unix:uid:$MY_UID" -x509SVIDTTL "$FANOUT_TTL"
done
write_standalone_conf fanout
stop_proc standalone
start_agent standalone
for a in "${ALL_AGENTS[@]}"; do
    # SPIRE backdates NotBefore by 10 s: allow for it.
    wait_probe "${SOCK[$a]}" --expect-id "$ID_FANOUT" --max-ttl "$((FANOUT_TTL + 15))" --timeout 60
done
for ((r = 1; r <= FANOUT_RUNS; r++)); do
    for agent in "${ALL_AGENTS[@]}"; do
        sock="${SOCK[$agent]}"
        # Start right after a rotation, so that every stream is open well before the next one.
        if ! fg_wait "${WLAPI[@]}" rotation "$sock" --timeout "$((FANOUT_TTL + 20))" >"$TMP/out/rot.out"; then
            log "  $agent: no rotation seen before fan-out run $r: $(cat "$TMP/out/rot.out")"
        fi
        loadgen "$agent" fanout "$r" fanout --socket "$sock" --streams "$FANOUT_STREAMS" \
            --connections "$FANOUT_CONNS" --agent-pid "${PIDS[$agent]}" --timeout "$((FANOUT_TTL + 30))s" --allow-errors
    done
done
# Back to the default TTL (1 h) for what follows; standalone is done.
stop_proc standalone
for a in "${SERVER_AGENTS[@]}"; do
    spire_entry_delete "am-fanout-$a"
    spire_entry "$a" "am-uid-$a" "$ID_UID" -selector "unix:uid:$MY_UID"
done
for a in "${SERVER_AGENTS[@]}"; do
    wait_probe "${SOCK[$a]}" --expect-id "$ID_UID" --timeout 60
done

# ------------------------------------------------- 2. entry create -> first SVID, server CPU
# latency_samples LABEL INTERVAL AGENT...: LATENCY_SAMPLES times: a FetchX509SVID stream per
# agent (bench/wlapi.py await-id, as the workload uid), a random pause (so that the create falls
# anywhere in the sync cycle), the clock, one `spire-server entry create -data` with one new
# entry per agent (unix:uid:MY_UID, a new SPIFFE ID), and the time each stream got it. Then the
# entries are deleted.
latency_samples() {
    local label="$1" interval="$2"
    shift 2
    local -a agents=("$@")
    local i a k t0 t1 tc out ok ms pause
    local -a pairs
    for ((i = 1; i <= LATENCY_SAMPLES; i++)); do
        if ((i > 1 && (i - 1) % LATENCY_BLOCK == 0)); then
            # A new block: a new phase of every agent's sync cycle (see LATENCY_BLOCK). The
            # order alternates between blocks: the agent restarted second starts its sync cycle
            # a few hundred ms after the first (the first's start-up, the second's stop), and
            # the cycles drift apart only slowly, so a fixed order would make the second agent
            # later in most samples of every block by that lag.
            local -a order=("${agents[@]}")
            if (((i - 1) / LATENCY_BLOCK % 2 == 1)); then
                order=()
                for ((k = ${#agents[@]} - 1; k >= 0; k--)); do order+=("${agents[$k]}"); done
            fi
            for a in "${order[@]}"; do
                stop_proc "$a"
                start_agent "$a"
            done
            for a in "${agents[@]}"; do
                wait_probe "${SOCK[$a]}" --expect-id "$ID_UID" --timeout 60
            done
            log "  block $(((i - 1) / LATENCY_BLOCK + 1)): restarted ${order[*]} (in this order)"
        fi
        for a in "${agents[@]}"; do
            : >"$TMP/out/await-$a.out"
            "${WLAPI[@]}" await-id "${SOCK[$a]}" --id "spiffe://$TRUST_DOMAIN/bench/latency/$a/$label/$i" \
                --timeout 120 >"$TMP/out/await-$a.out" 2>>"$TMP/logs/await.log" &
            PIDS[await-$a]=$!
        done
        for a in "${agents[@]}"; do
            for ((k = 0; k < 200; k++)); do
                grep -q '"ready"' "$TMP/out/await-$a.out" 2>/dev/null && break
                alive "${PIDS[await-$a]}" || break
                sleep 0.05
            done
            grep -q '"ready"' "$TMP/out/await-$a.out" || die "the stream on $a gave no first message: $(cat "$TMP/out/await-$a.out")"
        done
        pairs=()
        for a in "${agents[@]}"; do pairs+=("$a=${PARENT[$a]}"); done
        python3 - "$TMP/out/lat.json" "$TRUST_DOMAIN" "$MY_UID" "$label" "$i" "${pairs[@]}" <<'EOF'
import json, sys
path, td, uid, label, i = sys.argv[1:6]
parents = dict(p.split("=", 1) for p in sys.argv[6:])
entries = [{"entry_id": "am-lat-%s-%s-%s" % (a, label, i), "parent_id": parents[a],
            "spiffe_id": "spiffe://%s/bench/latency/%s/%s/%s" % (td, a, label, i),
            "selectors": [{"type": "unix", "value": "uid:%s" % uid}]} for a in parents]
json.dump({"entries": entries}, open(path, "w"))
EOF
        # Uniform over the longer of the two cycles (the agent's sync, the server's cache reload),
        # so that the samples do not lock onto either.
        pause="$(awk -v s="$RANDOM" -v iv="$interval" -v rl="${SERVER_CACHE_RELOAD:-5}" \
            'BEGIN{srand(s); m = iv > rl ? iv : rl; printf "%.3f", rand() * m}')"
        sleep "$pause"
        t0="$(now_us)"
        spire_cli entry create -data "$TMP/out/lat.json" >>"$TMP/logs/spire-entries.log" 2>&1 ||
            die "spire-server entry create -data (latency sample $i) failed (log: $TMP/logs/spire-entries.log)"
        tc="$(now_us)"
        for a in "${agents[@]}"; do
            wait "${PIDS[await-$a]}" 2>/dev/null || true
            unset "PIDS[await-$a]"
            out="$(grep '"ok"' "$TMP/out/await-$a.out" | tail -n 1 || true)"
            if [[ "$out" == *'"ok": true'* ]]; then
                t1="$(sed -n 's/.*"t_unix": \([0-9.]*\).*/\1/p' <<<"$out")"
                ms="$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b*1000 - a/1000}')"
                ok=true
            else
                ms=null
                ok=false
                log "  $a sample $i: no SVID: $out"
            fi
            emit "{\"type\":\"latency\",\"agent\":\"$a\",\"label\":$(json_str "$label"),\"sync_interval_s\":$interval\
,\"i\":$i,\"block\":$(((i - 1) / LATENCY_BLOCK + 1)),\"ok\":$ok,\"ms\":$ms,\"cli_ms\":$(us_to_ms $((tc - t0))),\"pause_s\":$pause}"
            if [[ "$ok" == true ]]; then log "  sample $i: $a got its new SVID $ms ms after entry create"; fi
        done
        for a in "${agents[@]}"; do
            spire_entry_delete "am-lat-$a-$label-$i"
        done
    done
}

# cpu_window LABEL RUNNING_AGENT|none INTERVAL: spire-server's CPU over CPU_WINDOW seconds with
# only RUNNING_AGENT attached and running (the other agents SIGSTOPped), and the sync RPCs it
# served (its own Prometheus counters).
cpu_window() {
    local label="$1" running="$2" interval="$3" a spid c0 c1 n0 n1 t0 t1 p0 p1 ar0 ar1 ac0 ac1
    spid="${PIDS[spire-server]}"
    for a in "${SERVER_AGENTS[@]}"; do
        [[ "$a" == "$running" ]] || kill -STOP "${PIDS[$a]}"
    done
    sleep 1
    p0="$(server_counts)"
    c0="$(cpu_ms "$spid")"
    n0="$(cpu_ns "$spid")"
    t0="$(now_us)"
    ac0=null
    if [[ "$running" != none ]]; then ac0="$(cpu_ms "${PIDS[$running]}")"; fi
    fg_wait sleep "$CPU_WINDOW"
    c1="$(cpu_ms "$spid")"
    n1="$(cpu_ns "$spid")"
    t1="$(now_us)"
    ac1=null
    if [[ "$running" != none ]]; then ac1="$(cpu_ms "${PIDS[$running]}")"; fi
    p1="$(server_counts)"
    for a in "${SERVER_AGENTS[@]}"; do
        [[ "$a" == "$running" ]] || kill -CONT "${PIDS[$a]}"
    done
    emit "{\"type\":\"cpu_window\",\"label\":$(json_str "$label"),\"running\":\"$running\",\"sync_interval_s\":$interval\
,\"seconds\":$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e6}')\
,\"server_cpu_ms\":$((c1 - c0)),\"server_cpu_ns\":$((n1 - n0)),\"agent_cpu_ms\":$([[ "$ac0" == null ]] && echo null || echo $((ac1 - ac0)))\
,\"counts_before\":$p0,\"counts_after\":$p1,\"loadavg\":$(json_str "$(loadavg)")}"
    log "  $label: server CPU $((c1 - c0)) ms (ticks) / $(((n1 - n0) / 1000000)) ms (schedstat) in ${CPU_WINDOW}s; counters $p0 -> $p1"
}

if [[ "$AGENT_MODE" == 1 ]]; then
    LAT_AGENTS=(spire-agent agent-mode)
else
    LAT_AGENTS=(spire-agent)
fi
step "2a. entry create -> first SVID: $LATENCY_SAMPLES samples, ${LAT_AGENTS[*]} at ${AGENT_SYNC}s sync (spire-agent: its default)"
emit_load "2a"
latency_samples "sync${AGENT_SYNC}" "$AGENT_SYNC" "${LAT_AGENTS[@]}"

step "2b. spire-server CPU per agent sync: ${CPU_WINDOW}s windows, each agent alone, $CPU_ROUNDS round(s)"
emit_load "2b"
for ((r = 1; r <= CPU_ROUNDS; r++)); do
    cpu_window "baseline $r" none 0
    cpu_window "spire-agent $r" spire-agent 5
    if [[ "$AGENT_MODE" == 1 ]]; then
        cpu_window "agent mode, sync ${AGENT_SYNC}s, $r" agent-mode "$AGENT_SYNC"
    fi
done
if [[ "$AGENT_MODE" == 1 ]]; then

    step "2c. spiffed agent mode at sync_interval ${SHORT_SYNC}s: latency and server CPU"
    emit_load "2c"
    write_agent_mode_conf "$SHORT_SYNC"
    stop_proc agent-mode
    start_agent agent-mode
    wait_probe "${SOCK[agent-mode]}" --expect-id "$ID_UID" --timeout 30
    latency_samples "sync${SHORT_SYNC}" "$SHORT_SYNC" agent-mode
    for ((r = 1; r <= CPU_ROUNDS; r++)); do
        cpu_window "agent mode, sync ${SHORT_SYNC}s, $r" agent-mode "$SHORT_SYNC"
        cpu_window "baseline $((CPU_ROUNDS + r))" none 0
    done
    write_agent_mode_conf "$AGENT_SYNC"
    stop_proc agent-mode
    start_agent agent-mode
fi

# ------------------------------------------------------------ 3. SYNC_ENTRIES entries, one node
# entries_of AGENT: sets SYNC_N to the entries the agent holds now (spire-agent: its
# lru_cache_record_map_size gauge; spiffed: the `entries` counter of the stats line it logs on
# SIGUSR1; "null" if unknown) and SYNC_SVIDS to the X.509-SVIDs it holds. Not in $(...).
spiffed_stats_line() {
    local name="$1" pid="${PIDS[$1]}" off i line cgt
    # Only once the agent catches SIGUSR1 (bit 10 of SigCgt): before, the signal would kill it.
    cgt="$(awk '/^SigCgt:/ {print $2}' "/proc/$pid/status" 2>/dev/null)"
    [[ -n "$cgt" ]] && (((16#$cgt >> 9) & 1)) || return 1
    off="$(stat -c %s "$TMP/logs/$name.log")"
    kill -USR1 "$pid" 2>/dev/null || return 1
    for ((i = 0; i < 200; i++)); do
        line="$(tail -c +"$((off + 1))" "$TMP/logs/$name.log" | grep ' stats' | tail -n 1 || true)"
        if [[ -n "$line" ]]; then
            echo "$line"
            return 0
        fi
        sleep 0.01
    done
    return 1
}
# field_of NAME LINE: the number after `NAME=` or `NAME: ` in a log line (first match).
field_of() { sed -n "s/^.*[ ,{]$1[=:] \\{0,1\\}\"\\{0,1\\}\\([0-9][0-9]*\\).*$/\\1/p" <<<"$2" | head -n 1; }
SYNC_N=null
SYNC_SVIDS=null
entries_of() {
    local line v
    SYNC_N=null
    SYNC_SVIDS=null
    case "$1" in
    spire-agent)
        line="$(curl -s -m 1 "$AGENT_PROM" 2>/dev/null || true)"
        v="$(awk '/^spire_agent_lru_cache_record_map_size[{ ]/ { v = $NF } END { if (v != "") printf "%d\n", v }' <<<"$line")"
        SYNC_N="${v:-0}"
        v="$(awk '/^spire_agent_lru_cache_svid_map_size[{ ]/ { v = $NF } END { if (v != "") printf "%d\n", v }' <<<"$line")"
        SYNC_SVIDS="${v:-null}"
        ;;
    agent-mode)
        if line="$(spiffed_stats_line agent-mode)"; then
            v="$(field_of entries "$line")"
            SYNC_N="${v:-null}"
            # `x509_svids_cached=N`, or `x509_svids=SvidStats { cached: N, ... }`.
            v="$(field_of x509_svids_cached "$line")"
            [[ -n "$v" ]] || v="$(field_of cached "$line")"
            SYNC_SVIDS="${v:-null}"
        fi
        ;;
    esac
}

# sync_many AGENT: stop the agent, register SYNC_ENTRIES entries under its node (unix:uid:N for
# uids no process has), start it and poll until it holds them all; then delete them.
sync_many() {
    local agent="$1" a f t0 t1 tc0 tc ts target n spid sc0 sn0 sc_b0 sc_b1 sb_t0 sb_t1 base_rate
    local series="" synced_ms=null rss_synced=null sc_synced=null sn_synced=null ac_synced=null pid k
    spid="${PIDS[spire-server]}"
    stop_proc "$agent"
    for a in "${SERVER_AGENTS[@]}"; do
        [[ "$a" == "$agent" ]] || kill -STOP "${PIDS[$a]}"
    done
    f="$TMP/out/sync-$agent.json"
    python3 - "$f" "$TRUST_DOMAIN" "${PARENT[$agent]}" "$agent" "$SYNC_ENTRIES" <<'EOF'
import json, sys
path, td, parent, agent, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
entries = [{"entry_id": "am-sync-%s-%06d" % (agent, i), "parent_id": parent,
            "spiffe_id": "spiffe://%s/bench/sync/%s/%d" % (td, agent, i),
            "selectors": [{"type": "unix", "value": "uid:%d" % (300000 + i)}]} for i in range(n)]
json.dump({"entries": entries}, open(path, "w"))
json.dump({"ids": [e["entry_id"] for e in entries]}, open(path + ".ids", "w"))
EOF
    tc0="$(now_us)"
    fg_wait "$SPIRE_SERVER" entry create -data "$f" -socketPath "$SERVER_SOCK" >"$TMP/out/sync-create.out" 2>&1 ||
        die "spire-server entry create -data ($SYNC_ENTRIES entries) failed: $(tail -n 3 "$TMP/out/sync-create.out")"
    tc="$(now_us)"
    log "  $SYNC_ENTRIES entries under $agent's node created in $(us_to_ms $(((tc - tc0) / 1000)))s"
    # The server's entry cache reloads every 5 s (cache_reload_interval): let it take them in,
    # and measure its CPU rate with no agent running meanwhile (the baseline).
    sleep "$((${SERVER_CACHE_RELOAD:-5} + 1))"
    sc_b0="$(cpu_ms "$spid")"
    sb_t0="$(now_us)"
    fg_wait sleep 10
    sc_b1="$(cpu_ms "$spid")"
    sb_t1="$(now_us)"
    base_rate="$(awk -v c="$((sc_b1 - sc_b0))" -v a="$sb_t0" -v b="$sb_t1" 'BEGIN{printf "%.3f", c / ((b-a)/1e6)}')"
    target=$((SYNC_ENTRIES + 1))
    if [[ "$agent" == spire-agent ]]; then write_spire_agent_conf 1; fi
    agent_cmd "$agent"
    sc0="$(cpu_ms "$spid")"
    sn0="$(cpu_ns "$spid")"
    rm -f "${SOCK[$agent]}"
    t0="$(now_us)"
    "${AGENT_CMD[@]}" </dev/null >>"$TMP/logs/$agent.log" 2>&1 &
    PIDS[$agent]=$!
    pid="${PIDS[$agent]}"
    # Poll every 0.05 s until the agent holds every entry.
    while :; do
        alive "$pid" || die "$agent exited while syncing (log: $TMP/logs/$agent.log)"
        entries_of "$agent"
        n="$SYNC_N"
        ts="$(now_us)"
        series+="${series:+,}{\"t_ms\":$(us_to_ms $((ts - t0))),\"entries\":$n,\"svids\":$SYNC_SVIDS,\"rss_kib\":$(rss_kib "$pid")\
,\"agent_cpu_ms\":$(cpu_ms "$pid"),\"server_cpu_ms\":$(($(cpu_ms "$spid") - sc0))}"
        if [[ "$n" != null ]] && ((n >= target)); then
            synced_ms="$(us_to_ms $((ts - t0)))"
            rss_synced="$(rss_kib "$pid")"
            sc_synced=$(($(cpu_ms "$spid") - sc0))
            sn_synced=$(($(cpu_ns "$spid") - sn0))
            ac_synced="$(cpu_ms "$pid")"
            break
        fi
        if (((ts - t0) / 1000000 >= SYNC_TIMEOUT)); then
            log "  $agent: not synced after ${SYNC_TIMEOUT}s (holds $n of $target)"
            break
        fi
        sleep 0.05
    done
    log "  $agent: $n entries after $synced_ms ms; RSS $((${rss_synced/null/0} / 1024)) MiB; server CPU $sc_synced ms"
    # Then every second for SYNC_SETTLE seconds (SVIDs minted for the entries, RSS settling).
    for ((k = 1; k <= SYNC_SETTLE; k++)); do
        sleep 1
        alive "$pid" || die "$agent exited after syncing (log: $TMP/logs/$agent.log)"
        entries_of "$agent"
        n="$SYNC_N"
        ts="$(now_us)"
        series+=",{\"t_ms\":$(us_to_ms $((ts - t0))),\"entries\":$n,\"svids\":$SYNC_SVIDS,\"rss_kib\":$(rss_kib "$pid")\
,\"agent_cpu_ms\":$(cpu_ms "$pid"),\"server_cpu_ms\":$(($(cpu_ms "$spid") - sc0))}"
    done
    t1="$(now_us)"
    emit "{\"type\":\"sync_many\",\"agent\":\"$agent\",\"entries\":$SYNC_ENTRIES,\"target\":$target\
,\"create_ms\":$(us_to_ms $((tc - tc0))),\"synced_ms\":$synced_ms\
,\"rss_synced_kib\":$rss_synced,\"rss_settled_kib\":$(rss_kib "$pid"),\"agent_cpu_synced_ms\":$ac_synced,\"agent_cpu_settled_ms\":$(cpu_ms "$pid")\
,\"server_cpu_synced_ms\":$sc_synced,\"server_cpu_synced_ns\":$sn_synced,\"server_cpu_settled_ms\":$(($(cpu_ms "$spid") - sc0))\
,\"settled_s\":$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e6}'),\"server_baseline_ms_per_s\":$base_rate\
,\"entries_last\":$n,\"svids_last\":$SYNC_SVIDS,\"series\":[$series]}"
    fg_wait "$SPIRE_SERVER" entry delete -file "$f.ids" -socketPath "$SERVER_SOCK" >"$TMP/out/sync-delete.out" 2>&1 ||
        die "spire-server entry delete -file failed: $(tail -n 3 "$TMP/out/sync-delete.out")"
    for a in "${SERVER_AGENTS[@]}"; do
        [[ "$a" == "$agent" ]] || kill -CONT "${PIDS[$a]}"
    done
}

step "3. $SYNC_ENTRIES entries parented to one node: start to all synced, RSS, server CPU (${SERVER_AGENTS[*]})"
emit_load "3"
for a in "${SERVER_AGENTS[@]}"; do
    log " $a"
    sync_many "$a"
done

# ------------------------------------------------------------ 4. server down, agent restarted
step "4. spire-server down; agents restarted (spiffed $DOWN_RUNS times; spire-agent once, up to ${DOWN_TIMEOUT}s)"
emit_load "4"
for a in "${SERVER_AGENTS[@]}"; do
    stop_proc "$a"
done
stop_proc spire-server
if [[ "$AGENT_MODE" == 1 ]]; then
    for ((r = 1; r <= DOWN_RUNS; r++)); do
        stop_proc agent-mode
        rc=0
        start_agent_try agent-mode 30 || rc=$?
        emit "{\"type\":\"down_startup\",\"agent\":\"agent-mode\",\"run\":$r,\"rc\":$rc,\"result\":$START_OUT}"
        if ((rc == 0)); then
            log "  agent mode, server down, restart $r: first SVID after $START_MS ms"
        else
            log "  agent mode, server down, restart $r: no SVID: $START_OUT"
        fi
        healthcheck_json agent-mode "server down, restart $r"
    done
    stop_proc agent-mode
fi
rc=0
start_agent_try spire-agent "$DOWN_TIMEOUT" || rc=$?
pid="${PIDS[spire-agent]}"
still=false
alive "$pid" && still=true
exit_code=null
if [[ "$still" == false ]]; then
    wait "$pid" 2>/dev/null && exit_code=0 || exit_code=$?
    unset "PIDS[spire-agent]"
fi
last_err="$(grep -E 'level=(error|fatal)' "$TMP/logs/spire-agent.log" | tail -n 1 | cut -c1-600)"
emit "{\"type\":\"down_startup\",\"agent\":\"spire-agent\",\"run\":1,\"rc\":$rc,\"result\":$START_OUT\
,\"still_running\":$still,\"exit_code\":$exit_code,\"last_error\":$(json_str "$last_err")\
,\"socket_exists\":$([[ -S "${SOCK[spire-agent]}" ]] && echo true || echo false),\"timeout_s\":$DOWN_TIMEOUT}"
log "  spire-agent, server down: $(cut -c1-300 <<<"$START_OUT"); exit code $exit_code; last error: $(cut -c1-200 <<<"$last_err")"
stop_proc spire-agent

# ------------------------------------------------------------ 5. stop, render
step "stopping"
for name in "${!PIDS[@]}"; do
    stop_proc "$name"
done
emit_load "end"
total=$(($(date +%s) - SCRIPT_START))
emit "{\"type\":\"end\",\"elapsed_s\":$total}"

step "rendering the Agent mode section of $OUT_MD"
python3 "$HERE/render_agent_mode.py" --results "$RESULTS" --splice "$OUT_MD" --root "$ROOT"
python3 "$HERE/render_agent_mode.py" --results "$RESULTS" --summary
# Keep only the raw data behind the section (other scripts' files are theirs).
if [[ "$OUT_MD" == "$ROOT/BENCHMARKS.md" ]]; then
    find "$RESULTS_DIR" -maxdepth 1 -name 'agent-mode-*.jsonl' ! -name "agent-mode-$STAMP_UTC.jsonl" -delete
fi
FAILED_STEP=""
log "done in ${total}s: $OUT_MD, raw results $RESULTS"
