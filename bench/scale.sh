#!/usr/bin/env bash
# spiffed at scale: 100,000 registration entries (issue 11), six measurements.
#
#   ENTRIES=100000 bench/scale.sh     the benchmark (as root; see bench/README.md for the time)
#   QUICK=1 bench/scale.sh            a try-out with 2,000 entries and small stream counts
#   LABEL=before bench/scale.sh       names the results file scale-before-<UTC>.jsonl
#
# Builds spiffed + spiffed-loadgen (profile dist; PROFILE=release to change; honours
# CARGO_TARGET_DIR), starts `spiffed run` in a temp dir, registers ENTRIES entries
# `unix:uid:N` through the admin socket in batches of BATCH (`spiffed entry create --from-file`),
# then measures:
#   1. one more `spiffed entry create` (CLI wall time) and one CreateEntries call (loadgen);
#   2. the agent's RSS after restarts, sampled every second for RSS_WATCH seconds;
#   3. restart to the first served SVID (bench/wlapi.py startup);
#   4. the first SVID of never-fetched entries: one child process per uid (spiffed-loadgen
#      first-fetch), and whether the agent had pre-minted them;
#   5. agent CPU per rotation of 100 streams (uid A, short TTL) with and without 9,900 idle
#      streams (uid B) open (spiffed-loadgen partial-rotation);
#   6. fan-out: 100,000 streams on 1,000 connections through one rotation.
# Raw JSON lines go to bench/results/scale[-LABEL]-<UTC>.jsonl; bench/render_scale.py renders
# the "Scale" section of BENCHMARKS.md from the newest results (and the newest "before" file).
# Needs root: the loadgen runs its children as other uids.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
WLAPI=(python3 "$HERE/wlapi.py")
SCRIPT_START=$(date +%s)
INVOCATION="bench/scale.sh${*:+ $*}"
KNOBS=(QUICK ENTRIES BATCH POPULATE_BUDGET SINGLE_CREATES STARTUP_RUNS RSS_WATCH RSS_SETTLE
    FIRST_FETCH_SAMPLES PR_REPS PR_WINDOW PR_ROTATING PR_IDLE PR_TTL FANOUT_STREAMS FANOUT_CONNS
    FANOUT_TTL FANOUT_RUNS PROFILE LOG_LEVEL LABEL KEEP_TMP CARGO_TARGET_DIR)
for v in "${KNOBS[@]}"; do
    if [[ -n "${!v+set}" ]]; then INVOCATION="$v=${!v} $INVOCATION"; fi
done

# ------------------------------------------------------------------------------------ knobs
QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
    d_entries=2000 d_ff=200 d_reps=1 d_window=5 d_idle=990 d_streams=5000 d_conns=50 d_fttl=30
    d_fruns=1 d_watch=10 d_startup=2 d_single=10
else
    d_entries=100000 d_ff=1000 d_reps=3 d_window=20 d_idle=9900 d_streams=100000 d_conns=1000
    d_fttl=90 d_fruns=2 d_watch=30 d_startup=3 d_single=20
fi
ENTRIES="${ENTRIES:-$d_entries}"
BATCH="${BATCH:-1000}"
# Stop registering when this many seconds have gone (the figures are then at the count reached).
POPULATE_BUDGET="${POPULATE_BUDGET:-1500}"
SINGLE_CREATES="${SINGLE_CREATES:-$d_single}"
STARTUP_RUNS="${STARTUP_RUNS:-$d_startup}"
RSS_WATCH="${RSS_WATCH:-$d_watch}"
RSS_SETTLE="${RSS_SETTLE:-5}"
FIRST_FETCH_SAMPLES="${FIRST_FETCH_SAMPLES:-$d_ff}"
PR_REPS="${PR_REPS:-$d_reps}"
PR_WINDOW="${PR_WINDOW:-$d_window}"
PR_ROTATING="${PR_ROTATING:-100}"
PR_IDLE="${PR_IDLE:-$d_idle}"
PR_TTL="${PR_TTL:-2}"
FANOUT_STREAMS="${FANOUT_STREAMS:-$d_streams}"
FANOUT_CONNS="${FANOUT_CONNS:-$d_conns}"
FANOUT_TTL="${FANOUT_TTL:-$d_fttl}"
FANOUT_RUNS="${FANOUT_RUNS:-$d_fruns}"
PROFILE="${PROFILE:-dist}"
LOG_LEVEL="${LOG_LEVEL:-info}"
LABEL="${LABEL:-}"
KEEP_TMP="${KEEP_TMP:-0}"
RESULTS_DIR="${RESULTS_DIR:-$HERE/results}"
OUT_MD="${OUT_MD:-$ROOT/BENCHMARKS.md}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
CACHE="${SPIFFED_BENCH_CACHE:-$HOME/.cache/spiffed-bench}"
TRUST_DOMAIN=example.org

# The uids: registered entries, the single creates, the two partial-rotation callers.
UID_BASE=200000
SINGLE_UID_BASE=190000
RPC_UID_BASE=191000
UID_ROTATING=150000
UID_IDLE=150001

for v in ENTRIES BATCH POPULATE_BUDGET SINGLE_CREATES STARTUP_RUNS RSS_WATCH RSS_SETTLE \
    FIRST_FETCH_SAMPLES PR_REPS PR_WINDOW PR_ROTATING PR_IDLE PR_TTL FANOUT_STREAMS FANOUT_CONNS \
    FANOUT_TTL FANOUT_RUNS; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
        echo "scale.sh: $v must be a whole number, got '${!v}'" >&2
        exit 2
    fi
done
for v in ENTRIES BATCH STARTUP_RUNS RSS_WATCH PR_ROTATING PR_TTL FANOUT_CONNS FANOUT_TTL; do
    if [[ "${!v}" -lt 1 ]]; then
        echo "scale.sh: $v must be at least 1" >&2
        exit 2
    fi
done
if ((BATCH > 1000)); then
    echo "scale.sh: BATCH may be at most 1000 (the admin API's limit per call)" >&2
    exit 2
fi
if ((UID_BASE + ENTRIES > 4000000000)); then
    echo "scale.sh: ENTRIES=$ENTRIES does not fit in the uid space above $UID_BASE" >&2
    exit 2
fi
if ((RSS_SETTLE > RSS_WATCH)); then RSS_SETTLE=$RSS_WATCH; fi
if ((FIRST_FETCH_SAMPLES > ENTRIES)); then FIRST_FETCH_SAMPLES=$ENTRIES; fi
if [[ -n "$LABEL" && ! "$LABEL" =~ ^[a-z0-9][a-z0-9-]*$ ]]; then
    echo "scale.sh: LABEL must be lower-case letters, digits and dashes (e.g. before), got '$LABEL'" >&2
    exit 2
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "scale.sh: run it as root: the load generator starts callers as other uids" \
        "(unix:uid:N entries), which needs root" >&2
    exit 2
fi

# Thousands of streams and connections: raise the soft fd limit for every child.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < FANOUT_CONNS + 1000)); then
    echo "scale.sh: the fd limit ($(ulimit -n)) is too low for FANOUT_CONNS=$FANOUT_CONNS; raise the hard limit (ulimit -Hn)" >&2
    exit 2
fi

# ---------------------------------------------------------------------------------- helpers
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

# stop_proc NAME: SIGTERM (SIGCONT first, in case it is still stopped), SIGKILL after 15 s.
stop_proc() {
    local name="$1" pid i
    pid="${PIDS[$name]:-}"
    [[ -n "$pid" ]] || return 0
    unset "PIDS[$name]"
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM for 15s; SIGKILL"
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
            keep="$CACHE/failed-logs/scale-$(date -u +%Y%m%dT%H%M%SZ)"
            { mkdir -p "$keep" && cp -r "$TMP/logs" "$TMP/conf" "$keep/" && gzip -r "$keep/logs"; } 2>/dev/null || true
            log "logs and config copied to $keep (KEEP_TMP=1 keeps the whole temp dir)"
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
# cpu_ms PID: utime + stime in ms.
cpu_ms() {
    sed 's/.*) //' "/proc/$1/stat" 2>/dev/null |
        awk -v t="$CLK_TCK" '{ printf "%d\n", ($12 + $13) * 1000 / t }' || echo null
}
# now_us: microseconds since the epoch, without a fork.
now_us() {
    local t="${EPOCHREALTIME/./}"
    echo "$t"
}

# ------------------------------------------------------------------------------------ build
step "packaging/build-ordered.sh $PROFILE; cargo build --profile $PROFILE -p spiffed-loadgen (CARGO_TARGET_DIR=$TARGET_DIR)"
command -v cargo >/dev/null || die "cargo not found"
command -v python3 >/dev/null || die "python3 not found (bench/wlapi.py and the renderer need it)"
if ! CARGO_TARGET_DIR="$TARGET_DIR" "$ROOT/packaging/build-ordered.sh" "$PROFILE" >/dev/null; then
    die "packaging/build-ordered.sh $PROFILE failed (output above)"
fi
if ! (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --profile "$PROFILE" -p spiffed-loadgen); then
    die "cargo build --profile $PROFILE -p spiffed-loadgen failed (output above)"
fi
SPIFFED="$(realpath "$TARGET_DIR/$PROFILE/spiffed")"
LOADGEN="$(realpath "$TARGET_DIR/$PROFILE/spiffed-loadgen")"
[[ -x "$SPIFFED" && -x "$LOADGEN" ]] || die "no $SPIFFED or $LOADGEN after the build"

# ------------------------------------------------------------------------------ temp dir
step "temp dir and config"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/spiffed-scale.XXXXXX")"
# The callers run as other uids: they must reach the socket (the agent makes its own dirs).
chmod 755 "$TMP"
mkdir -p "$TMP/logs" "$TMP/conf" "$TMP/out" "$TMP/batches"
mkdir -p "$RESULTS_DIR"
STAMP_UTC="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS="$RESULTS_DIR/scale${LABEL:+-$LABEL}-$STAMP_UTC.jsonl"
: >"$RESULTS"
log "temp dir $TMP; results -> $RESULTS"

SOCK="$TMP/agent/api.sock"
ADMIN_SOCK="$TMP/agent/admin/admin.sock"
CONF="$TMP/conf/spiffed.toml"
# The agent's limits are raised for the stream scenarios; the rest are the defaults.
# min_svid_ttl allows the partial-rotation entry's short TTL.
cat >"$CONF" <<EOF
trust_domain = "$TRUST_DOMAIN"
socket_path = "$SOCK"
admin_socket_path = "$ADMIN_SOCK"
data_dir = "$TMP/agent/data"
log_level = "$LOG_LEVEL"
min_svid_ttl = "1s"
max_connections_per_uid = $((FANOUT_CONNS + 100 > 4096 ? FANOUT_CONNS + 100 : 4096))
max_streams_per_connection = $(((FANOUT_STREAMS + FANOUT_CONNS - 1) / FANOUT_CONNS + 100))
max_streams_per_uid = $((FANOUT_STREAMS + 10000 > 20000 ? FANOUT_STREAMS + 10000 : 20000))
EOF

cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
mem_kib="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
git_commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git_branch="$(git -C "$ROOT" rev-parse --abbrev-ref HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    git_dirty=true
else
    git_dirty=false
fi
emit "{\"type\":\"meta\",\"utc\":$(json_str "$STAMP_UTC"),\"label\":$(json_str "$LABEL")\
,\"invocation\":$(json_str "$INVOCATION")\
,\"knobs\":{\"QUICK\":$(json_str "$QUICK"),\"ENTRIES\":$ENTRIES,\"BATCH\":$BATCH,\"POPULATE_BUDGET\":$POPULATE_BUDGET\
,\"SINGLE_CREATES\":$SINGLE_CREATES,\"STARTUP_RUNS\":$STARTUP_RUNS,\"RSS_WATCH\":$RSS_WATCH,\"RSS_SETTLE\":$RSS_SETTLE\
,\"FIRST_FETCH_SAMPLES\":$FIRST_FETCH_SAMPLES,\"PR_REPS\":$PR_REPS,\"PR_WINDOW\":$PR_WINDOW\
,\"PR_ROTATING\":$PR_ROTATING,\"PR_IDLE\":$PR_IDLE,\"PR_TTL\":$PR_TTL,\"FANOUT_STREAMS\":$FANOUT_STREAMS\
,\"FANOUT_CONNS\":$FANOUT_CONNS,\"FANOUT_TTL\":$FANOUT_TTL,\"FANOUT_RUNS\":$FANOUT_RUNS\
,\"PROFILE\":$(json_str "$PROFILE"),\"LOG_LEVEL\":$(json_str "$LOG_LEVEL")}\
,\"uids\":{\"entries_first\":$UID_BASE,\"single_first\":$SINGLE_UID_BASE,\"rpc_first\":$RPC_UID_BASE\
,\"rotating\":$UID_ROTATING,\"idle\":$UID_IDLE,\"probe\":$(id -u)}\
,\"machine\":{\"nproc\":$(nproc),\"cpu\":$(json_str "$cpu_model"),\"kernel\":$(json_str "$(uname -r)")\
,\"mem_kib\":${mem_kib:-null}}\
,\"versions\":{\"spiffed_commit\":$(json_str "$git_commit"),\"branch\":$(json_str "$git_branch"),\"spiffed_dirty\":$git_dirty\
,\"rustc\":$(json_str "$(rustc --version 2>/dev/null || echo unknown)")\
,\"python\":$(json_str "$(python3 --version 2>&1)")}\
,\"config\":$(json_str "$(sed "s|$TMP|TMP|g" "$CONF")")\
,\"nofile_limit\":$(json_str "$(ulimit -n)")}"

# ------------------------------------------------------------------------------ the agent
# start_agent: spawns `spiffed run` stopped before exec; wlapi.py starts the clock, resumes it
# and polls the socket every millisecond until an SVID arrives. Sets START_OUT and START_MS.
START_OUT=""
START_MS=""
start_agent() {
    local out
    rm -f "$SOCK"
    (
        kill -STOP "$BASHPID"
        exec "$SPIFFED" run --config "$CONF" </dev/null >>"$TMP/logs/spiffed.log" 2>&1
    ) &
    PIDS[spiffed]=$!
    if ! out="$("${WLAPI[@]}" startup --pid "${PIDS[spiffed]}" --socket "$SOCK" --timeout 600)"; then
        log "spiffed did not serve an SVID: $out"
        die "spiffed failed to start (log: $TMP/logs/spiffed.log)"
    fi
    START_OUT="$out"
    START_MS="$(sed -n 's/.*"first_svid_ms": \([0-9.]*\).*/\1/p' <<<"$out")"
}

# admin ARGS...: `spiffed entry ... --admin-socket` with output in $TMP/out/admin.out.
admin() {
    "$SPIFFED" entry "$@" --admin-socket "$ADMIN_SOCK" >"$TMP/out/admin.out" 2>>"$TMP/logs/admin.log"
}

# entry_id: the "id" of the one entry in $TMP/out/admin.out (`entry create --output json`).
entry_id() {
    python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); v=v[0] if isinstance(v,list) else v; v=v.get("entry",v); print(v["id"])' \
        "$TMP/out/admin.out"
}

# loadgen CASE ARGS...: runs the loadgen; its JSON lines go to the results wrapped with CASE.
loadgen() {
    local case="$1"
    shift
    local out="$TMP/out/lg.out" err="$TMP/out/lg.err" rc=0 line n=0
    local cmdline="spiffed-loadgen $*"
    fg_wait "$LOADGEN" "$@" >"$out" 2>"$err" || rc=$?
    sed 's/^/    /' "$err" >&2
    while IFS= read -r line; do
        [[ "$line" == \{* ]] || continue
        n=$((n + 1))
        emit "{\"type\":\"result\",\"case\":\"$case\",\"rc\":$rc,\"cmd\":$(json_str "$cmdline"),\"result\":$line}"
    done <"$out"
    if [[ $rc -ne 0 || $n -eq 0 ]]; then
        log "  $case failed (exit $rc); recorded"
        emit "{\"type\":\"failure\",\"case\":\"$case\",\"rc\":$rc,\"cmd\":$(json_str "$cmdline")\
,\"stderr\":$(json_str "$(tail -n 5 "$err")")}"
    fi
}

step "spiffed run (first start: new CA) and the probe's entry unix:uid:$(id -u)"
# The start-up probe (wlapi.py, as root) needs an entry: start without waiting for an SVID.
rm -f "$SOCK"
"$SPIFFED" run --config "$CONF" </dev/null >>"$TMP/logs/spiffed.log" 2>&1 &
PIDS[spiffed]=$!
for ((i = 0; i < 200; i++)); do
    [[ -S "$ADMIN_SOCK" && -S "$SOCK" ]] && break
    alive "${PIDS[spiffed]}" || die "spiffed exited (log: $TMP/logs/spiffed.log)"
    sleep 0.05
done
[[ -S "$ADMIN_SOCK" ]] || die "spiffed made no admin socket in 10s"
admin create --spiffe-id "spiffe://$TRUST_DOMAIN/scale/probe" --selector "unix:uid:$(id -u)" --output json ||
    die "creating the probe entry failed (log: $TMP/logs/admin.log)"
PROBE_ID="$(entry_id)"
"${WLAPI[@]}" wait "$SOCK" --expect-id "spiffe://$TRUST_DOMAIN/scale/probe" --timeout 30 >/dev/null ||
    die "the probe entry is not served"

# ------------------------------------------------------------------------------ populate
step "registering $ENTRIES entries unix:uid:$UID_BASE.. in batches of $BATCH (budget ${POPULATE_BUDGET}s)"
python3 - "$TMP/batches" "$ENTRIES" "$BATCH" "$UID_BASE" "$TRUST_DOMAIN" <<'EOF'
import json, os, sys
d, n, b, base, td = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
for k, start in enumerate(range(0, n, b)):
    specs = [{"spiffe_id": "spiffe://%s/scale/uid/%d" % (td, base + i), "selectors": ["unix:uid:%d" % (base + i)]}
             for i in range(start, min(n, start + b))]
    with open(os.path.join(d, "batch-%06d.json" % k), "w") as f:
        json.dump(specs, f)
EOF
POP_START="$(now_us)"
REGISTERED=0
POP_STOPPED=false
BATCH_CMD="spiffed entry create --from-file BATCH.json --admin-socket ADMIN_SOCKET --output json"
k=0
for f in "$TMP"/batches/batch-*.json; do
    n=$((ENTRIES - REGISTERED < BATCH ? ENTRIES - REGISTERED : BATCH))
    t0="$(now_us)"
    if ! fg_wait "$SPIFFED" entry create --from-file "$f" --admin-socket "$ADMIN_SOCK" --output json \
        >"$TMP/out/batch.out" 2>>"$TMP/logs/admin.log"; then
        die "entry create --from-file $(basename "$f") failed (log: $TMP/logs/admin.log)"
    fi
    t1="$(now_us)"
    REGISTERED=$((REGISTERED + n))
    k=$((k + 1))
    emit "{\"type\":\"populate_batch\",\"batch\":$k,\"count\":$n,\"registered\":$REGISTERED\
,\"seconds\":$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e6}')\
,\"rss_kib\":$(rss_kib "${PIDS[spiffed]}"),\"cpu_ms\":$(cpu_ms "${PIDS[spiffed]}")}"
    if ((k == 1 || k % 10 == 0)); then
        log "  $REGISTERED entries; this batch took $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b-a)/1e6}')s"
    fi
    if (((t1 - POP_START) / 1000000 >= POPULATE_BUDGET && REGISTERED < ENTRIES)); then
        POP_STOPPED=true
        log "  the ${POPULATE_BUDGET}s budget is spent: stopping at $REGISTERED of $ENTRIES entries"
        break
    fi
done
POP_END="$(now_us)"
emit "{\"type\":\"populate\",\"requested\":$ENTRIES,\"registered\":$REGISTERED,\"stopped_by_budget\":$POP_STOPPED\
,\"seconds\":$(awk -v a="$POP_START" -v b="$POP_END" 'BEGIN{printf "%.3f", (b-a)/1e6}'),\"cmd\":$(json_str "$BATCH_CMD")}"
UID_LAST=$((UID_BASE + REGISTERED - 1))
if ((FIRST_FETCH_SAMPLES > REGISTERED)); then FIRST_FETCH_SAMPLES=$REGISTERED; fi

# ------------------------------------------------------------------ 2 + 3: restarts, RSS
step "restart to first SVID and RSS with $REGISTERED entries ($STARTUP_RUNS restarts, ${RSS_WATCH}s each)"
for ((r = 1; r <= STARTUP_RUNS; r++)); do
    stop_proc spiffed
    start_agent
    log "  restart $r: first SVID after $START_MS ms"
    emit "{\"type\":\"startup\",\"run\":$r,\"entries\":$REGISTERED,\"result\":$START_OUT}"
    pid="${PIDS[spiffed]}"
    series=""
    for ((s = 1; s <= RSS_WATCH; s++)); do
        sleep 1
        series+="${series:+,}{\"t_s\":$s,\"rss_kib\":$(rss_kib "$pid"),\"cpu_ms\":$(cpu_ms "$pid"),\"fds\":$(fd_count "$pid")}"
    done
    emit "{\"type\":\"rss_series\",\"run\":$r,\"entries\":$REGISTERED,\"samples\":[$series]}"
    log "  restart $r: RSS $(($(rss_kib "$pid") / 1024)) MiB after ${RSS_WATCH}s"
done

# -------------------------------------------------------------------- 1: one more create
step "1. $SINGLE_CREATES single creates with the CLI, then $SINGLE_CREATES CreateEntries calls (loadgen)"
SINGLE_CMD="spiffed entry create --spiffe-id spiffe://$TRUST_DOMAIN/scale/single/N --selector unix:uid:N --admin-socket ADMIN_SOCKET"
for ((i = 0; i < SINGLE_CREATES; i++)); do
    u=$((SINGLE_UID_BASE + i))
    t0="$(now_us)"
    admin create --spiffe-id "spiffe://$TRUST_DOMAIN/scale/single/$u" --selector "unix:uid:$u" ||
        die "entry create (single, uid $u) failed (log: $TMP/logs/admin.log)"
    t1="$(now_us)"
    emit "{\"type\":\"single_create\",\"i\":$((i + 1)),\"entries_before\":$((REGISTERED + 1 + i)),\"us\":$((t1 - t0)),\"cmd\":$(json_str "$SINGLE_CMD")}"
done
loadgen admin_create admin-create --admin-socket "$ADMIN_SOCK" --count "$SINGLE_CREATES" \
    --first-uid "$RPC_UID_BASE" --trust-domain "$TRUST_DOMAIN" --allow-errors

# --------------------------------------------------------------- 4: first fetch per uid
step "4. first SVID of $FIRST_FETCH_SAMPLES never-fetched entries (one child per uid in $UID_BASE-$UID_LAST)"
loadgen first_fetch first-fetch --socket "$SOCK" --uids "$UID_BASE-$UID_LAST" \
    --samples "$FIRST_FETCH_SAMPLES" --allow-errors

# ----------------------------------------------------------------- 5: partial rotation
step "5. partial rotation: $PR_ROTATING streams of uid $UID_ROTATING (TTL ${PR_TTL}s), with and without $PR_IDLE idle streams of uid $UID_IDLE"
admin create --spiffe-id "spiffe://$TRUST_DOMAIN/scale/rotating" --selector "unix:uid:$UID_ROTATING" \
    --x509-svid-ttl "${PR_TTL}s" --output json || die "creating the rotating entry failed (log: $TMP/logs/admin.log)"
ROT_ID="$(entry_id)"
admin create --spiffe-id "spiffe://$TRUST_DOMAIN/scale/idle" --selector "unix:uid:$UID_IDLE" --output json ||
    die "creating the idle entry failed (log: $TMP/logs/admin.log)"
IDLE_ID="$(entry_id)"
idle_conns=$(((PR_IDLE + 99) / 100))
for ((r = 1; r <= PR_REPS; r++)); do
    for idle in 0 "$PR_IDLE"; do
        case="partial_rotation_base"
        ((idle > 0)) && case="partial_rotation_loaded"
        log "  run $r: $case"
        loadgen "$case" partial-rotation --socket "$SOCK" --agent-pid "${PIDS[spiffed]}" \
            --rotating-uid "$UID_ROTATING" --rotating-streams "$PR_ROTATING" \
            --rotating-connections "$(((PR_ROTATING + 99) / 100))" \
            --idle-uid "$UID_IDLE" --idle-streams "$idle" --idle-connections "$((idle > 0 ? idle_conns : 1))" \
            --window "${PR_WINDOW}s" --allow-errors
    done
done
admin delete "$ROT_ID" "$IDLE_ID" || die "deleting the partial-rotation entries failed (log: $TMP/logs/admin.log)"

# --------------------------------------------------------------------------- 6: fan-out
step "6. fan-out: $FANOUT_STREAMS streams on $FANOUT_CONNS connections, probe entry TTL ${FANOUT_TTL}s"
admin update "$PROBE_ID" --x509-svid-ttl "${FANOUT_TTL}s" || die "entry update of the probe entry failed"
"${WLAPI[@]}" wait "$SOCK" --expect-id "spiffe://$TRUST_DOMAIN/scale/probe" --max-ttl "$((FANOUT_TTL + 15))" \
    --timeout 30 >/dev/null || die "the probe entry's SVID did not take the ${FANOUT_TTL}s TTL"
for ((r = 1; r <= FANOUT_RUNS; r++)); do
    # Start right after a rotation, so that every stream is open well before the next one.
    if ! fg_wait "${WLAPI[@]}" rotation "$SOCK" --timeout "$((FANOUT_TTL + 20))" >"$TMP/out/rot.out"; then
        log "  no rotation seen before fan-out run $r: $(cat "$TMP/out/rot.out")"
    fi
    log "  run $r"
    loadgen fanout fanout --socket "$SOCK" --streams "$FANOUT_STREAMS" --connections "$FANOUT_CONNS" \
        --agent-pid "${PIDS[spiffed]}" --timeout "$((FANOUT_TTL + 60))s" --allow-errors
done

# ------------------------------------------------------------------------------- finish
step "stopping the agent"
emit "{\"type\":\"final\",\"rss_kib\":$(rss_kib "${PIDS[spiffed]}"),\"cpu_ms\":$(cpu_ms "${PIDS[spiffed]}")\
,\"log_bytes\":$(stat -c %s "$TMP/logs/spiffed.log")}"
stop_proc spiffed
emit "{\"type\":\"end\",\"elapsed_s\":$(($(date +%s) - SCRIPT_START))}"

step "rendering the Scale section of $OUT_MD"
python3 "$HERE/render_scale.py" --results-dir "$RESULTS_DIR" --splice "$OUT_MD" --root "$ROOT"
python3 "$HERE/render_scale.py" --results-dir "$RESULTS_DIR" --summary
FAILED_STEP=""
log "done in $(($(date +%s) - SCRIPT_START))s: $RESULTS"
