#!/usr/bin/env bash
# spiffed measured side by side with SPIRE's agent (v1.13.3) and the floor baseline.
#
#   bench/compare-spire.sh            full run (about 35 minutes on 2 cores)
#   QUICK=1 bench/compare-spire.sh    a couple of minutes, to try it out
#
# Builds spire-server + spire-agent from the pinned module in bench/spire/tool (cached outside the
# checkout), builds spiffed + spiffed-loadgen with the `dist` profile (LTO; PROFILE=release to change), starts spire-server, spire-agent,
# spiffed and the loadgen's floor server in a temp dir, runs the same loadgen scenarios against
# each in alternation, writes every raw result line to bench/results/<UTC>.jsonl and renders
# BENCHMARKS.md at the repo root (bench/render.py). See bench/README.md for the knobs.
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
INVOCATION="$0${*:+ $*}"
# The knobs the caller set, to show the exact invocation in BENCHMARKS.md.
for v in QUICK RUNS BENCH_SECONDS CONCURRENCY FANOUT_STREAMS FANOUT_CONNS FANOUT_TTL SDS_FANOUT CHURN_SECONDS \
    SPIRE_CHURN_SECONDS CHURN_RATE STARTUP_RUNS LOG_LEVEL KEEP_TMP CARGO_TARGET_DIR PROFILE; do
    if [[ -n "${!v+set}" ]]; then INVOCATION="$v=${!v} $INVOCATION"; fi
done
if [[ -n "$ENV_SECONDS" ]]; then INVOCATION="SECONDS=$ENV_SECONDS $INVOCATION"; fi

# ------------------------------------------------------------------------------------ knobs
QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
    d_runs=1 d_seconds=1 d_streams=1000 d_conns=10 d_churn=10 d_startup=3 d_ttl=20
else
    d_runs=3 d_seconds=5 d_streams=10000 d_conns=100 d_churn=600 d_startup=3 d_ttl=60
fi
RUNS="${RUNS:-$d_runs}"
DURATION="${BENCH_SECONDS:-${ENV_SECONDS:-$d_seconds}}"
FANOUT_STREAMS="${FANOUT_STREAMS:-$d_streams}"
FANOUT_CONNS="${FANOUT_CONNS:-$d_conns}"
FANOUT_TTL="${FANOUT_TTL:-$d_ttl}"
# The SDS fan-out (StreamSecrets streams, `spiffed-loadgen sds-fanout`) after each Workload API
# fan-out run, on both agents; 0 leaves it out.
SDS_FANOUT="${SDS_FANOUT:-1}"
CHURN_SECONDS="${CHURN_SECONDS:-$d_churn}"
# spire-agent's churn run may be shorter than spiffed's (the churn target is spiffed's).
SPIRE_CHURN_SECONDS="${SPIRE_CHURN_SECONDS:-$CHURN_SECONDS}"
# The cargo profile measured: `dist` (LTO, what we recommend deploying) or `release`.
PROFILE="${PROFILE:-dist}"
LOADGEN_PROFILE="${LOADGEN_PROFILE:-loadgen}"
CHURN_RATE="${CHURN_RATE:-1000}"
STARTUP_RUNS="${STARTUP_RUNS:-$d_startup}"
CONCURRENCY="${CONCURRENCY:-16}"
LOG_LEVEL="${LOG_LEVEL:-info}"
KEEP_TMP="${KEEP_TMP:-0}"
CACHE="${SPIFFED_BENCH_CACHE:-$HOME/.cache/spiffed-bench}"
INTEROP_CACHE="${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}"
RESULTS_DIR="${RESULTS_DIR:-$HERE/results}"
OUT_MD="${OUT_MD:-$ROOT/BENCHMARKS.md}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TRUST_DOMAIN=example.org

for v in RUNS FANOUT_STREAMS FANOUT_CONNS FANOUT_TTL CHURN_SECONDS SPIRE_CHURN_SECONDS CHURN_RATE \
    STARTUP_RUNS CONCURRENCY; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]] || [[ "${!v}" -lt 1 ]]; then
        echo "compare-spire.sh: $v must be a positive integer, got '${!v}'" >&2
        exit 2
    fi
done
if ! [[ "$DURATION" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "compare-spire.sh: SECONDS/BENCH_SECONDS must be a number, got '$DURATION'" >&2
    exit 2
fi
if [[ "$SDS_FANOUT" != 0 && "$SDS_FANOUT" != 1 ]]; then
    echo "compare-spire.sh: SDS_FANOUT must be 0 or 1, got '$SDS_FANOUT'" >&2
    exit 2
fi

# Fan-out and churn open thousands of descriptors: raise the soft limit for every child.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------------------------- helpers
exec 5>&1 6>&2
TMP=""
FAILED_STEP=""
declare -A PIDS=()

log() { printf '[%s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - SCRIPT_START ))" "$*" >&2; }

step() {
    FAILED_STEP="$*"
    log "== $*"
}

# Prints the last lines of every log in the temp dir.
show_logs() {
    [[ -n "$TMP" && -d "$TMP" ]] || return 0
    local f
    for f in "$TMP"/logs/*.log; do
        [[ -s "$f" ]] || continue
        echo "----- last 25 lines of $f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

die() {
    log "ERROR: $*"
    exit 1
}

alive() {
    local pid="$1" st
    [[ -r "/proc/$pid/stat" ]] || return 1
    st="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)" || return 1
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

# stop_proc NAME: SIGTERM (SIGCONT first, in case it is still stopped), SIGKILL after 10 s.
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
    # A signal may arrive inside a redirected command (the loadgen's output files): back to the
    # script's own stdout/stderr.
    exec 1>&5 2>&6
    local name
    for name in "${!PIDS[@]}"; do
        stop_proc "$name"
    done
    if [[ $rc -ne 0 ]]; then
        log "FAILED (exit $rc)${FAILED_STEP:+ during: $FAILED_STEP}"
        show_logs
        if [[ -n "$TMP" && -d "$TMP" ]]; then
            if [[ "$KEEP_TMP" == 1 ]]; then
                log "logs, configs and data kept in $TMP"
            else
                local keep
                keep="$CACHE/failed-logs/$(date -u +%Y%m%dT%H%M%SZ)"
                { mkdir -p "$keep" && cp -r "$TMP/logs" "$TMP/conf" "$keep/" && gzip -r "$keep/logs"; } 2>/dev/null || true
                log "logs and configs copied to $keep (KEEP_TMP=1 keeps the whole temp dir)"
            fi
        fi
    fi
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        if [[ "$KEEP_TMP" == 1 ]]; then
            [[ $rc -eq 0 ]] && log "temp dir kept: $TMP"
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

# fg_wait CMD...: runs CMD in the background and waits for it, so that a signal to this script
# (trapped: cleanup) is handled at once and not only when a 10-minute churn run ends.
fg_wait() {
    local rc=0
    "$@" &
    PIDS[fg]=$!
    wait "${PIDS[fg]}" || rc=$?
    unset "PIDS[fg]"
    return "$rc"
}

# JSON string of $1.
json_str() {
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    s="${s//$'\n'/\\n}"
    s="${s//$'\t'/\\t}"
    printf '"%s"' "$s"
}

# emit JSON-OBJECT: appends one line to the results file.
emit() { printf '%s\n' "$1" >>"$RESULTS"; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo null; }
fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

# ---------------------------------------------------------------- 1. SPIRE (cached build)
GO_MODCACHE="${SPIFFED_BENCH_GOMODCACHE:-}"
if [[ -z "$GO_MODCACHE" ]]; then
    if [[ -d "$INTEROP_CACHE/go/pkg/mod" ]]; then
        GO_MODCACHE="$INTEROP_CACHE/go/pkg/mod"
    else
        GO_MODCACHE="$CACHE/go/pkg/mod"
    fi
fi
GO_BUILDCACHE="${SPIFFED_BENCH_GOCACHE:-}"
if [[ -z "$GO_BUILDCACHE" ]]; then
    if [[ -d "$INTEROP_CACHE/go-build" ]]; then
        GO_BUILDCACHE="$INTEROP_CACHE/go-build"
    else
        GO_BUILDCACHE="$CACHE/go-build"
    fi
fi
SPIRE_DIR="$CACHE/spire/$SPIRE_VERSION"
SPIRE_SERVER="$SPIRE_DIR/bin/spire-server"
SPIRE_AGENT="$SPIRE_DIR/bin/spire-agent"
SPIRE_STAMP="$SPIRE_DIR/stamp"

spire_stamp_text() {
    printf 'spire %s\ngo.mod %s\ngo.sum %s\n' "$SPIRE_VERSION" \
        "$(sha256sum <"$TOOL_DIR/go.mod" | cut -d' ' -f1)" \
        "$(sha256sum <"$TOOL_DIR/go.sum" | cut -d' ' -f1)"
}

spire_cached() {
    [[ -x "$SPIRE_SERVER" && -x "$SPIRE_AGENT" && -f "$SPIRE_STAMP" ]] &&
        [[ "$(cat "$SPIRE_STAMP")" == "$(spire_stamp_text)" ]]
}

build_spire() {
    if ! grep -q "github.com/spiffe/spire $SPIRE_VERSION" "$TOOL_DIR/go.mod"; then
        die "$TOOL_DIR/go.mod does not pin github.com/spiffe/spire $SPIRE_VERSION"
    fi
    if spire_cached; then
        log "reusing cached SPIRE $SPIRE_VERSION in $SPIRE_DIR/bin"
        return 0
    fi
    command -v go >/dev/null || die "go not found: it is needed once to build SPIRE $SPIRE_VERSION"
    mkdir -p "$SPIRE_DIR" "$GO_MODCACHE" "$GO_BUILDCACHE"
    # One build at a time per cache.
    exec 8>"$SPIRE_DIR/.build.lock"
    flock 8
    if spire_cached; then
        flock -u 8
        log "reusing SPIRE $SPIRE_VERSION built by a concurrent run"
        return 0
    fi
    local tmpbin start blog
    tmpbin="$(mktemp -d "$SPIRE_DIR/.gobin.XXXXXX")"
    blog="$SPIRE_DIR/build.log"
    start=$(date +%s)
    log "building spire-server + spire-agent $SPIRE_VERSION (GOMODCACHE=$GO_MODCACHE GOCACHE=$GO_BUILDCACHE;" \
        "a cold build downloads ~300 modules and takes several minutes on 2 cores; log: $blog)"
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
    log "built SPIRE $SPIRE_VERSION in $(($(date +%s) - start))s -> $SPIRE_DIR/bin"
}

step "SPIRE $SPIRE_VERSION"
build_spire

# ------------------------------------------------------------ 2. spiffed (profile $PROFILE)
# The loadgen, the measuring tool, has its own profile (fat LTO, opt-level 3), so that dist's
# size optimisations never slow the client (as in agent-mode.sh).
step "packaging/build-ordered.sh $PROFILE (spiffed, its functions in link order); cargo build --profile $LOADGEN_PROFILE -p spiffed-loadgen (CARGO_TARGET_DIR=$TARGET_DIR)"
command -v cargo >/dev/null || die "cargo not found"
if ! CARGO_TARGET_DIR="$TARGET_DIR" "$ROOT/packaging/build-ordered.sh" "$PROFILE" >/dev/null; then
    die "packaging/build-ordered.sh $PROFILE failed (output above)"
fi
if ! (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --profile "$LOADGEN_PROFILE" -p spiffed-loadgen); then
    die "cargo build --profile $LOADGEN_PROFILE -p spiffed-loadgen failed (output above)"
fi
SPIFFED="$TARGET_DIR/$PROFILE/spiffed"
LOADGEN="$(realpath "$TARGET_DIR/$LOADGEN_PROFILE/spiffed-loadgen")"
[[ -x "$SPIFFED" && -x "$LOADGEN" ]] || die "no $SPIFFED or $LOADGEN after the build"
LOADGEN_SHA256="$(sha256sum "$LOADGEN" | cut -d' ' -f1)"

# ---------------------------------------------------------------- 3. the temp dir and the agents
step "temp dir"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/spiffed-bench.XXXXXX")"
chmod 755 "$TMP"
mkdir -p "$TMP/logs" "$TMP/conf" "$TMP/spire/server/data" "$TMP/spire/agent/data" \
    "$TMP/spiffed/data" "$TMP/out"
mkdir -p "$RESULTS_DIR"
STAMP_UTC="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS="$RESULTS_DIR/$STAMP_UTC.jsonl"
: >"$RESULTS"
log "temp dir $TMP; results -> $RESULTS"

MY_UID="$(id -u)"
ID_UID="spiffe://$TRUST_DOMAIN/bench/uid"
ID_PATH="spiffe://$TRUST_DOMAIN/bench/path"
SPIFFED_SOCK="$TMP/spiffed/api.sock"
SPIRE_SOCK="$TMP/spire/agent/api.sock"
SERVER_SOCK="$TMP/spire/server/api.sock"
FLOOR_SOCK="$TMP/floor.sock"
declare -A SOCK=([spiffed]="$SPIFFED_SOCK" [spire-agent]="$SPIRE_SOCK" [floor]="$FLOOR_SOCK")

# --- metadata
cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
mem_kib="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
git_commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    git_dirty=true
else
    git_dirty=false
fi
emit "{\"type\":\"meta\",\"utc\":$(json_str "$STAMP_UTC"),\"invocation\":$(json_str "$INVOCATION")\
,\"knobs\":{\"QUICK\":$(json_str "$QUICK"),\"RUNS\":$RUNS,\"SECONDS\":$DURATION,\"CONCURRENCY\":$CONCURRENCY\
,\"FANOUT_STREAMS\":$FANOUT_STREAMS,\"FANOUT_CONNS\":$FANOUT_CONNS,\"FANOUT_TTL\":$FANOUT_TTL,\"SDS_FANOUT\":$SDS_FANOUT\
,\"CHURN_SECONDS\":$CHURN_SECONDS,\"SPIRE_CHURN_SECONDS\":$SPIRE_CHURN_SECONDS\
,\"CHURN_RATE\":$CHURN_RATE,\"STARTUP_RUNS\":$STARTUP_RUNS,\"PROFILE\":$(json_str "$PROFILE")\
,\"LOG_LEVEL\":$(json_str "$LOG_LEVEL")}\
,\"machine\":{\"nproc\":$(nproc),\"cpu\":$(json_str "$cpu_model"),\"kernel\":$(json_str "$(uname -r)")\
,\"mem_kib\":${mem_kib:-null}}\
,\"versions\":{\"spiffed_commit\":$(json_str "$git_commit"),\"spiffed_dirty\":$git_dirty\
,\"rustc\":$(json_str "$(rustc --version 2>/dev/null || echo unknown)")\
,\"spire\":$(json_str "$SPIRE_VERSION"),\"spire_agent_version\":$(json_str "$("$SPIRE_AGENT" --version 2>&1 | head -1)")\
,\"go\":$(json_str "$(go version 2>/dev/null || echo 'not installed (cached SPIRE binaries)')")\
,\"python\":$(json_str "$(python3 --version 2>&1)")}\
,\"uid\":$MY_UID,\"loadgen\":$(json_str "$LOADGEN"),\"loadgen_sha256\":$(json_str "$LOADGEN_SHA256"),\"loadgen_size_bytes\":$(stat -c %s "$LOADGEN")\
,\"cargo_target_dir\":$(json_str "$TARGET_DIR"),\"nofile_limit\":$(json_str "$(ulimit -n)")}"

# --- floor
step "floor server"
"$LOADGEN" floor --socket "$FLOOR_SOCK" </dev/null >>"$TMP/logs/floor.log" 2>&1 &
PIDS[floor]=$!
for ((i = 0; i < 200; i++)); do
    [[ -S "$FLOOR_SOCK" ]] && break
    alive "${PIDS[floor]}" || die "the floor server exited (log: $TMP/logs/floor.log)"
    sleep 0.05
done
[[ -S "$FLOOR_SOCK" ]] || die "the floor server did not create $FLOOR_SOCK in 10s"

# --- spire-server
step "spire-server"
SPIRE_PORT="$("${WLAPI[@]}" freeport)"
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
EOF
"$SPIRE_SERVER" run -config "$TMP/conf/server.conf" </dev/null >>"$TMP/logs/spire-server.log" 2>&1 &
PIDS[spire-server]=$!
spire_cli() { "$SPIRE_SERVER" "$@" -socketPath "$SERVER_SOCK"; }
for ((i = 0; ; i++)); do
    if "$SPIRE_SERVER" healthcheck -socketPath "$SERVER_SOCK" >/dev/null 2>&1; then break; fi
    alive "${PIDS[spire-server]}" || die "spire-server exited (log: $TMP/logs/spire-server.log)"
    ((i < 300)) || die "spire-server not healthy after 30s (log: $TMP/logs/spire-server.log)"
    sleep 0.1
done
TOKEN="$(spire_cli token generate -ttl 86400 | sed -n 's/^Token: //p')"
[[ -n "$TOKEN" ]] || die "spire-server token generate printed no token"
AGENT_ID="spiffe://$TRUST_DOMAIN/spire/agent/join_token/$TOKEN"

# spire_entry ENTRY_ID SPIFFE_ID [extra args...]: creates an entry under our agent.
spire_entry() {
    local eid="$1" sid="$2"
    shift 2
    spire_cli entry create -entryID "$eid" -parentID "$AGENT_ID" -spiffeID "$sid" "$@" \
        >>"$TMP/logs/spire-entries.log" 2>&1 ||
        die "spire-server entry create -entryID $eid failed (log: $TMP/logs/spire-entries.log)"
}
spire_entry_delete() {
    spire_cli entry delete -entryID "$1" >>"$TMP/logs/spire-entries.log" 2>&1 ||
        die "spire-server entry delete -entryID $1 failed (log: $TMP/logs/spire-entries.log)"
}

# write_spire_agent_conf DISCOVER(true|false)
write_spire_agent_conf() {
    cat >"$TMP/conf/agent.conf" <<EOF
agent {
    data_dir = "$TMP/spire/agent/data"
    log_level = "${LOG_LEVEL^^}"
    server_address = "127.0.0.1"
    server_port = "$SPIRE_PORT"
    socket_path = "$SPIRE_SOCK"
    insecure_bootstrap = true
    trust_domain = "$TRUST_DOMAIN"
    join_token = "$TOKEN"
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    # "disk", not "memory": with an in-memory key the agent cannot reuse its SVID after a
    # restart and would need a new join token (the start-up scenario restarts it).
    KeyManager "disk" {
        plugin_data {
            directory = "$TMP/spire/agent/data"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {
            discover_workload_path = $1
        }
    }
}
EOF
}

# write_spiffed_conf SET(uid|path|fanout)
write_spiffed_conf() {
    local entries
    case "$1" in
    uid)
        entries="[[entries]]
spiffe_id = \"$ID_UID\"
selectors = [\"unix:uid:$MY_UID\"]"
        ;;
    fanout)
        entries="[[entries]]
spiffe_id = \"$ID_UID\"
selectors = [\"unix:uid:$MY_UID\"]
x509_svid_ttl = \"${FANOUT_TTL}s\""
        ;;
    path)
        entries="[[entries]]
spiffe_id = \"$ID_PATH\"
selectors = [\"unix:path:$LOADGEN\", \"unix:sha256:$LOADGEN_SHA256\"]"
        ;;
    *) die "write_spiffed_conf: unknown set $1" ;;
    esac
    cat >"$TMP/conf/spiffed.toml" <<EOF
trust_domain = "$TRUST_DOMAIN"
socket_path = "$SPIFFED_SOCK"
admin_socket_path = "$TMP/spiffed/admin/admin.sock"
data_dir = "$TMP/spiffed/data"
log_level = "$LOG_LEVEL"

$entries
EOF
}

# start_agent NAME: starts spiffed or spire-agent as a child of this shell; the child stops itself
# before exec so that wlapi.py can start the clock and poll every millisecond for the first SVID.
# Sets START_OUT (wlapi's JSON line) and START_MS; exits on failure. Not in $(...): PIDS must be
# set in this shell.
START_OUT=""
START_MS=""
start_agent() {
    local name="$1" sock out
    local -a cmd
    case "$name" in
    spiffed) cmd=("$SPIFFED" run --config "$TMP/conf/spiffed.toml") ;;
    spire-agent) cmd=("$SPIRE_AGENT" run -config "$TMP/conf/agent.conf") ;;
    *) die "start_agent: unknown agent $name" ;;
    esac
    sock="${SOCK[$name]}"
    rm -f "$sock"
    (
        kill -STOP "$BASHPID"
        exec "${cmd[@]}" </dev/null >>"$TMP/logs/$name.log" 2>&1
    ) &
    PIDS[$name]=$!
    if ! out="$("${WLAPI[@]}" startup --pid "${PIDS[$name]}" --socket "$sock" --timeout 90)"; then
        log "$name did not serve an SVID: $out"
        die "$name failed to start (log: $TMP/logs/$name.log)"
    fi
    START_OUT="$out"
    START_MS="$(sed -n 's/.*"first_svid_ms": \([0-9.]*\).*/\1/p' <<<"$out")"
}

# restart_agent NAME: stop, start (not measured); waits for the first SVID.
restart_agent() {
    stop_proc "$1"
    start_agent "$1"
}

# wait_probe SOCKET ARGS...: wlapi.py wait; exits on failure.
wait_probe() {
    local sock="$1" out
    shift
    if ! out="$("${WLAPI[@]}" wait "$sock" "$@")"; then
        die "waiting on $sock ($*) failed: $out"
    fi
}

# wait_loadgen_served SOCKET: the loadgen itself (set B entries match only its binary) gets an SVID.
wait_loadgen_served() {
    local sock="$1" i
    for ((i = 0; i < 120; i++)); do
        if "$LOADGEN" cold --socket "$sock" --concurrency 1 --seconds 0.2 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    die "the loadgen got no SVID from $sock within 60s"
}

# record_rss LABEL: one idle-RSS record for every running agent process.
record_idle() {
    local label="$1" name pid
    for name in spiffed spire-agent spire-server floor; do
        pid="${PIDS[$name]:-}"
        [[ -n "$pid" ]] || continue
        emit "{\"type\":\"idle\",\"label\":$(json_str "$label"),\"agent\":\"$name\",\"pid\":$pid\
,\"rss_kib\":$(rss_kib "$pid"),\"fds\":$(fd_count "$pid")}"
    done
}

# loadgen AGENT CASE RUN ARGS...: runs the loadgen, appends its JSON lines (wrapped) to the
# results; a failed run is recorded as a failure, never aborts the script.
loadgen() {
    local agent="$1" case="$2" run="$3"
    shift 3
    local out="$TMP/out/lg.out" err="$TMP/out/lg.err" rc=0 line n=0
    local cmdline="spiffed-loadgen $*"
    log "$case run $run: $agent"
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

# --- set A ("uid") everywhere
step "spire-agent (join token, set A entry unix:uid:$MY_UID)"
spire_entry bench-uid "$ID_UID" -selector "unix:uid:$MY_UID"
write_spire_agent_conf false
start_agent spire-agent
log "spire-agent serves: $START_MS ms after spawn (node attestation + first sync)"
wait_probe "$SPIRE_SOCK" --expect-id "$ID_UID" --timeout 60

step "spiffed (set A entry unix:uid:$MY_UID)"
write_spiffed_conf uid
start_agent spiffed
log "spiffed serves (first start, new CA): $START_MS ms after spawn"
emit "{\"type\":\"startup_first\",\"agent\":\"spiffed\",\"result\":$START_OUT}"
wait_probe "$SPIFFED_SOCK" --expect-id "$ID_UID" --timeout 10

# ------------------------------------------------------------ 4a. start-up and idle RSS
step "start-up with existing state ($STARTUP_RUNS restarts each) and idle RSS"
for ((r = 1; r <= STARTUP_RUNS; r++)); do
    for name in spiffed spire-agent; do
        stop_proc "$name"
        start_agent "$name"
        log "$name restart $r: first SVID after $START_MS ms"
        emit "{\"type\":\"startup\",\"agent\":\"$name\",\"run\":$r,\"result\":$START_OUT}"
    done
    # Idle: 2 s after the last start-up probe, no client connected.
    sleep 2
    record_idle "after restart $r"
done

# ------------------------------------------------------------ 4b. cold and warm, set A
step "cold/warm, set A (uid), $RUNS run(s) x ${DURATION}s, alternating spiffed / spire-agent / floor"
for ((r = 1; r <= RUNS; r++)); do
    for c in cold cold_c1 warm_jwt_uid warm_x509_uid; do
        for agent in spiffed spire-agent floor; do
            sock="${SOCK[$agent]}"
            case "$c" in
            cold_c1) loadgen "$agent" "$c" "$r" cold --socket "$sock" --concurrency 1 --seconds "$DURATION" --allow-errors ;;
            cold) loadgen "$agent" "$c" "$r" cold --socket "$sock" --concurrency "$CONCURRENCY" --seconds "$DURATION" --allow-errors ;;
            warm_jwt_uid) loadgen "$agent" "$c" "$r" warm --rpc jwt --socket "$sock" --concurrency "$CONCURRENCY" --seconds "$DURATION" --allow-errors ;;
            warm_x509_uid) loadgen "$agent" "$c" "$r" warm --rpc x509 --socket "$sock" --concurrency "$CONCURRENCY" --seconds "$DURATION" --allow-errors ;;
            esac
        done
    done
done

# ------------------------------------------------------------ 4c. churn, set A
step "churn ${CHURN_RATE}/s for ${CHURN_SECONDS}s, one run per agent"
for agent in spiffed spire-agent; do
    secs="$CHURN_SECONDS"
    if [[ "$agent" == spire-agent ]]; then secs="$SPIRE_CHURN_SECONDS"; fi
    loadgen "$agent" churn 1 churn --socket "${SOCK[$agent]}" --rate "$CHURN_RATE" --seconds "$secs" \
        --agent-pid "${PIDS[$agent]}" --allow-errors
done

# ------------------------------------------------------------ 4d. fan-out (short SVID TTL)
step "fan-out (Workload API$([[ $SDS_FANOUT == 1 ]] && echo ", then SDS")): x509 TTL ${FANOUT_TTL}s on the uid entry of both agents"
spire_entry_delete bench-uid
spire_entry bench-fanout "$ID_UID" -selector "unix:uid:$MY_UID" -x509SVIDTTL "$FANOUT_TTL"
write_spiffed_conf fanout
restart_agent spiffed
wait_probe "$SPIFFED_SOCK" --expect-id "$ID_UID" --max-ttl "$((FANOUT_TTL + 15))" --timeout 10
# SPIRE backdates NotBefore by 10 s: allow for it.
wait_probe "$SPIRE_SOCK" --expect-id "$ID_UID" --max-ttl "$((FANOUT_TTL + 15))" --timeout 60
fanout_timeout="$((FANOUT_TTL + 30))s"
for ((r = 1; r <= RUNS; r++)); do
    for agent in spiffed spire-agent; do
        sock="${SOCK[$agent]}"
        # Start right after a rotation, so that every stream is open well before the next one.
        if ! fg_wait "${WLAPI[@]}" rotation "$sock" --timeout "$((FANOUT_TTL + 20))" >"$TMP/out/rot.out"; then
            log "  $agent: no rotation seen before fan-out run $r: $(cat "$TMP/out/rot.out")"
        fi
        loadgen "$agent" fanout "$r" fanout --socket "$sock" --streams "$FANOUT_STREAMS" \
            --connections "$FANOUT_CONNS" --agent-pid "${PIDS[$agent]}" --timeout "$fanout_timeout" --allow-errors
        [[ $SDS_FANOUT == 1 ]] || continue
        # The same with SDS StreamSecrets streams ([default, ROOTCA], as Istio asks), on the same
        # entry and TTL: the issue-14 target is the same rotation budget as the Workload API's.
        if ! fg_wait "${WLAPI[@]}" rotation "$sock" --timeout "$((FANOUT_TTL + 20))" >"$TMP/out/rot.out"; then
            log "  $agent: no rotation seen before SDS fan-out run $r: $(cat "$TMP/out/rot.out")"
        fi
        loadgen "$agent" sds_fanout "$r" sds-fanout --socket "$sock" --streams "$FANOUT_STREAMS" \
            --connections "$FANOUT_CONNS" --names default,ROOTCA --agent-pid "${PIDS[$agent]}" \
            --timeout "$fanout_timeout" --allow-errors
    done
done

# ------------------------------------------------------------ 4e. warm JWT, set B (path + sha256)
step "set B (unix:path + unix:sha256 of the loadgen) on both agents"
spire_entry_delete bench-fanout
spire_entry bench-path "$ID_PATH" -selector "unix:path:$LOADGEN" -selector "unix:sha256:$LOADGEN_SHA256"
write_spire_agent_conf true
restart_agent_spire_b() {
    stop_proc spire-agent
    # The probe (python3) matches no set-B entry: start without waiting for an SVID, then wait
    # for the socket and for the loadgen to be served.
    rm -f "$SPIRE_SOCK"
    "$SPIRE_AGENT" run -config "$TMP/conf/agent.conf" </dev/null >>"$TMP/logs/spire-agent.log" 2>&1 &
    PIDS[spire-agent]=$!
    wait_probe "$SPIRE_SOCK" --denied --timeout 60
    wait_loadgen_served "$SPIRE_SOCK"
}
restart_agent_spire_b
write_spiffed_conf path
stop_proc spiffed
rm -f "$SPIFFED_SOCK"
"$SPIFFED" run --config "$TMP/conf/spiffed.toml" </dev/null >>"$TMP/logs/spiffed.log" 2>&1 &
PIDS[spiffed]=$!
wait_probe "$SPIFFED_SOCK" --denied --timeout 20
wait_loadgen_served "$SPIFFED_SOCK"

step "warm JWT, set B (path + sha256), $RUNS run(s)"
for ((r = 1; r <= RUNS; r++)); do
    for agent in spiffed spire-agent floor; do
        loadgen "$agent" warm_jwt_path "$r" warm --rpc jwt --socket "${SOCK[$agent]}" \
            --concurrency "$CONCURRENCY" --seconds "$DURATION" --allow-errors
    done
done

# ------------------------------------------------------------ 5. stop, render
step "stopping the agents"
for name in spiffed spire-agent floor spire-server; do
    stop_proc "$name"
done
total=$(($(date +%s) - SCRIPT_START))
emit "{\"type\":\"end\",\"elapsed_s\":$total}"

step "rendering $OUT_MD"
python3 "$HERE/render.py" --results "$RESULTS" --analysis "$HERE/ANALYSIS.md" --out "$OUT_MD" --root "$ROOT"
# Keep only the raw data of the run that produced BENCHMARKS.md (bench/scale.sh's scale-*.jsonl,
# bench/agent-mode.sh's agent-mode-*.jsonl and bench/fleet.sh's fleet-*.jsonl files are theirs:
# their sections come from them; bench/ab.sh's ab-*.jsonl, e.g. bench/metrics-cost.sh's, are the
# raw data of figures quoted in bench/ANALYSIS.md).
if [[ "$OUT_MD" == "$ROOT/BENCHMARKS.md" ]]; then
    find "$RESULTS_DIR" -maxdepth 1 -name '*.jsonl' ! -name 'scale-*' ! -name 'agent-mode-*' ! -name 'fleet-*' ! -name 'ab-*' ! -name "$STAMP_UTC.jsonl" -delete
fi
FAILED_STEP=""
log "done in ${total}s: $OUT_MD, raw results $RESULTS"
