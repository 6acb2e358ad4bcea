#!/usr/bin/env bash
# A fleet on a highly available SPIRE Server (issue 13, point 3): two spire-server v1.13.3
# sharing a private PostgreSQL, one name resolving to both, and N agents on this machine, each
# with ENTRIES entries; spiffed agents, then the same number of spire-agents. One run measures:
#   - time from start to every agent serving; spire-server CPU and RSS per agent in steady state
#     (sync every 5 s), PostgreSQL CPU, agent CPU and RSS; for spiffed and for spire-agent;
#   - SIGKILL to one server: time until every spiffed agent reconnected to and synced through
#     the other, what the workloads saw (streams broken, fetch errors, SVIDs outside their
#     validity, healthcheck readiness), and the return when the server is back;
#   - `spire-server entry create` on either server -> the workload's stream has the SVID.
#
#   sudo bench/fleet.sh               AGENTS=50 (11 minutes here on 2 cores, plus the build)
#   sudo QUICK=1 bench/fleet.sh       a try-out: 3 agents, short windows (about 4 minutes)
#   sudo LABEL=capacity AGENTS=150 PARTS=spiffed,spire-agent bench/fleet.sh
#                                     a row of the capacity table: start and steady state only
#
# Root is required (each agent runs in its own mount namespace, with the fleet's hosts file
# bind-mounted over /etc/hosts; PostgreSQL runs as the `postgres` user). The orchestration is
# bench/fleet.py (stdlib Python, bench/wlapi.py for the Workload API); results go to
# bench/results/fleet-<UTC>.jsonl and bench/render_fleet.py splices the "Fleet" section of
# BENCHMARKS.md. See bench/README.md, "Fleet".
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SPIRE_VERSION=v1.13.3
SCRIPT_START=$(date +%s)
INVOCATION="bench/fleet.sh${*:+ $*}"
KNOBS=(QUICK AGENTS ENTRIES SYNC_INTERVAL SETTLE BASE_WINDOW STEADY_WINDOW STREAMS_PER_AGENT FAILOVER_TTL
    FAILOVER_OBSERVE RETURN_TIMEOUT LATENCY_SAMPLES LATENCY_BATCH START_TIMEOUT RATELIMIT PARTS LABEL PROFILE
    SPIFFED_BIN LOG_LEVEL KEEP_TMP CARGO_TARGET_DIR)
for v in "${KNOBS[@]}"; do
    if [[ -n "${!v+set}" ]]; then INVOCATION="$v=${!v} $INVOCATION"; fi
done

# ------------------------------------------------------------------------------------ knobs
QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
    d_agents=3 d_settle=5 d_base=10 d_steady=15 d_observe=35 d_samples=6 d_batch=3
else
    d_agents=50 d_settle=20 d_base=30 d_steady=60 d_observe=45 d_samples=60 d_batch=5
fi
export AGENTS="${AGENTS:-$d_agents}"
export ENTRIES="${ENTRIES:-20}"
export SYNC_INTERVAL="${SYNC_INTERVAL:-5}"
export SETTLE="${SETTLE:-$d_settle}"
export BASE_WINDOW="${BASE_WINDOW:-$d_base}"
export STEADY_WINDOW="${STEADY_WINDOW:-$d_steady}"
export STREAMS_PER_AGENT="${STREAMS_PER_AGENT:-2}"
export FAILOVER_TTL="${FAILOVER_TTL:-30}"
export FAILOVER_OBSERVE="${FAILOVER_OBSERVE:-$d_observe}"
export RETURN_TIMEOUT="${RETURN_TIMEOUT:-120}"
export LATENCY_SAMPLES="${LATENCY_SAMPLES:-$d_samples}"
export LATENCY_BATCH="${LATENCY_BATCH:-$d_batch}"
export START_TIMEOUT="${START_TIMEOUT:-300}"
# 0: the servers' per-IP rate limits (1 attestation/s, 500 signatures/s) are off: every agent
# here connects from 127.0.0.1, as behind a load balancer (what SPIRE documents the knob for).
export RATELIMIT="${RATELIMIT:-0}"
export PARTS="${PARTS:-spiffed,failover,latency,spire-agent}"
# capacity: a run that only adds a row to the section's capacity table (fleet-capacity-<UTC>.jsonl).
LABEL="${LABEL:-}"
PROFILE="${PROFILE:-dist}"
export LOG_LEVEL="${LOG_LEVEL:-info}"
KEEP_TMP="${KEEP_TMP:-0}"
CACHE="${SPIFFED_BENCH_CACHE:-$HOME/.cache/spiffed-bench}"
INTEROP_CACHE="${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}"
RESULTS_DIR="${RESULTS_DIR:-$HERE/results}"
OUT_MD="${OUT_MD:-$ROOT/BENCHMARKS.md}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

for v in AGENTS ENTRIES SYNC_INTERVAL STREAMS_PER_AGENT FAILOVER_TTL LATENCY_SAMPLES LATENCY_BATCH; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]] || [[ "${!v}" -lt 1 ]]; then
        echo "fleet.sh: $v must be a positive integer, got '${!v}'" >&2
        exit 2
    fi
done
for v in SETTLE BASE_WINDOW STEADY_WINDOW FAILOVER_OBSERVE RETURN_TIMEOUT START_TIMEOUT; do
    if ! [[ "${!v}" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
        echo "fleet.sh: $v must be a number of seconds, got '${!v}'" >&2
        exit 2
    fi
done
if ((AGENTS > 1000)); then echo "fleet.sh: AGENTS may be at most 1000" >&2; exit 2; fi
if ((ENTRIES > 1000)); then echo "fleet.sh: ENTRIES may be at most 1000 per agent" >&2; exit 2; fi
case "$LABEL" in "" | capacity) ;; *) echo "fleet.sh: LABEL must be empty or capacity, got '$LABEL'" >&2; exit 2 ;; esac
case "$RATELIMIT" in 0 | 1) ;; *) echo "fleet.sh: RATELIMIT must be 0 or 1, got '$RATELIMIT'" >&2; exit 2 ;; esac
IFS=, read -r -a parts <<<"$PARTS"
for p in "${parts[@]}"; do
    case "$p" in spiffed | failover | latency | spire-agent) ;; *)
        echo "fleet.sh: PARTS is a comma-separated list of spiffed, failover, latency, spire-agent; got '$p'" >&2
        exit 2
        ;;
    esac
done
if [[ "$(id -u)" != 0 ]]; then
    echo "fleet.sh: must run as root: each agent gets its own mount namespace (unshare --mount) with the" \
        "fleet's hosts file over /etc/hosts, and PostgreSQL runs as the postgres user (sudo bench/fleet.sh)" >&2
    exit 2
fi
for c in python3 unshare setpriv; do
    command -v "$c" >/dev/null || { echo "fleet.sh: $c not found" >&2; exit 2; }
done
PG_BIN=""
for d in /usr/lib/postgresql/*/bin; do
    if [[ -x "$d/initdb" && -x "$d/postgres" && -x "$d/createdb" && -x "$d/pg_isready" ]]; then PG_BIN="$d"; fi
done
if [[ -z "$PG_BIN" ]]; then
    echo "fleet.sh: PostgreSQL's server binaries are missing (/usr/lib/postgresql/*/bin/initdb ...):" \
        "apt-get install -y postgresql (the script starts a private cluster, never the system one)" >&2
    exit 2
fi
export PG_BIN

# An agent per fd budget: streams, sockets, children.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log() { printf '[%s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - SCRIPT_START))" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

# ------------------------------------------------------------------------ the binaries
# SPIRE: SPIRE_SERVER/SPIRE_AGENT from the environment, else compare-spire.sh's cache, else the
# interop tests' cache, else tests/spire/build.sh (which builds and caches them).
if [[ -n "${SPIRE_SERVER:-}" || -n "${SPIRE_AGENT:-}" ]]; then
    [[ -x "${SPIRE_SERVER:-}" && -x "${SPIRE_AGENT:-}" ]] || die "SPIRE_SERVER and SPIRE_AGENT must both name executables"
    SPIRE_SOURCE=environment
elif [[ -x "$CACHE/spire/$SPIRE_VERSION/bin/spire-server" && -x "$CACHE/spire/$SPIRE_VERSION/bin/spire-agent" ]]; then
    SPIRE_SERVER="$CACHE/spire/$SPIRE_VERSION/bin/spire-server"
    SPIRE_AGENT="$CACHE/spire/$SPIRE_VERSION/bin/spire-agent"
    SPIRE_SOURCE="$CACHE/spire/$SPIRE_VERSION/bin (compare-spire.sh's cache)"
else
    d="$("$ROOT/tests/spire/build.sh" | tail -n 1)" || die "tests/spire/build.sh failed"
    SPIRE_SERVER="$d/spire-server"
    SPIRE_AGENT="$d/spire-agent"
    SPIRE_SOURCE="$d (tests/spire/build.sh)"
fi
[[ -x "$SPIRE_SERVER" && -x "$SPIRE_AGENT" ]] || die "no spire-server/spire-agent ($SPIRE_SERVER, $SPIRE_AGENT)"
export SPIRE_SERVER SPIRE_AGENT

if [[ -n "${SPIFFED_BIN:-}" ]]; then
    [[ -x "$SPIFFED_BIN" ]] || die "SPIFFED_BIN must name an executable"
    SPIFFED="$(realpath "$SPIFFED_BIN")"
    PROFILE=prebuilt
else
    log "packaging/build-ordered.sh $PROFILE (CARGO_TARGET_DIR=$TARGET_DIR)"
    CARGO_TARGET_DIR="$TARGET_DIR" "$ROOT/packaging/build-ordered.sh" "$PROFILE" >/dev/null ||
        die "packaging/build-ordered.sh $PROFILE failed (output above)"
    pdir="$PROFILE"
    if [[ "$PROFILE" == dev ]]; then pdir=debug; fi
    SPIFFED="$(realpath "$TARGET_DIR/$pdir/spiffed")"
fi
export SPIFFED

# ------------------------------------------------------------------------------ the run
TMP="$(mktemp -d "${TMPDIR:-/tmp}/spiffed-fleet.XXXXXX")"
chmod 755 "$TMP"
export FLEET_TMP="$TMP"
cleanup() {
    local rc=$?
    if [[ $rc -ne 0 && -d "$TMP/logs" ]]; then
        local keep f
        keep="$CACHE/failed-logs/fleet-$(date -u +%Y%m%dT%H%M%SZ)"
        mkdir -p "$keep" && cp -r "$TMP/logs" "$keep/" 2>/dev/null && gzip -rq "$keep/logs" || true
        for f in "$TMP"/logs/spire-server*.log "$TMP"/logs/postgres.log; do
            [[ -s "$f" ]] && { echo "----- last 15 lines of $f" >&2; tail -n 15 "$f" >&2; }
        done
        log "FAILED (exit $rc); logs copied to $keep"
    fi
    if [[ "$KEEP_TMP" == 1 ]]; then log "temp dir kept: $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$RESULTS_DIR"
STAMP_UTC="$(date -u +%Y%m%dT%H%M%SZ)"
export FLEET_RESULTS="$RESULTS_DIR/fleet-${LABEL:+$LABEL-}$STAMP_UTC.jsonl"
: >"$FLEET_RESULTS"
git_commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then dirty=true; else dirty=false; fi
python3 - "$FLEET_RESULTS" <<EOF
import json, os, sys
env = os.environ
rec = {"type": "meta", "utc": "$STAMP_UTC", "label": "$LABEL", "invocation": $(json_str "$INVOCATION"),
       "knobs": {k: env.get(k) for k in "QUICK AGENTS ENTRIES SYNC_INTERVAL SETTLE BASE_WINDOW STEADY_WINDOW STREAMS_PER_AGENT FAILOVER_TTL FAILOVER_OBSERVE RETURN_TIMEOUT LATENCY_SAMPLES LATENCY_BATCH START_TIMEOUT RATELIMIT PARTS LOG_LEVEL".split()},
       "profile": "$PROFILE", "nice": os.nice(0),
       "machine": {"nproc": os.cpu_count(), "cpu": $(json_str "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"),
                   "kernel": $(json_str "$(uname -r)"), "mem_kib": $(awk '/^MemTotal:/ {print $2}' /proc/meminfo),
                   "loadavg_start": $(json_str "$(cut -d' ' -f1-3 /proc/loadavg)")},
       "versions": {"spiffed_commit": "$git_commit", "spiffed_dirty": $( [[ $dirty == true ]] && echo True || echo False ),
                    "spiffed": $(json_str "$("$SPIFFED" --version 2>&1 | head -1)"),
                    "spire": "$SPIRE_VERSION", "spire_source": $(json_str "$SPIRE_SOURCE"),
                    "postgres": $(json_str "$("$PG_BIN/postgres" --version)"),
                    "python": $(json_str "$(python3 --version 2>&1)")}}
open(sys.argv[1], "a").write(json.dumps(rec, sort_keys=True) + "\n")
EOF
log "temp dir $TMP; results -> $FLEET_RESULTS"
python3 "$HERE/fleet.py"
python3 - "$FLEET_RESULTS" <<EOF
import json, sys
open(sys.argv[1], "a").write(json.dumps({"type": "end", "seconds": $(($(date +%s) - SCRIPT_START))}) + "\n")
EOF
log "done in $(($(date +%s) - SCRIPT_START)) s"

# ---------------------------------------------------------------------------- rendering
if [[ -z "$LABEL" ]]; then
    python3 "$HERE/render_fleet.py" --results "$FLEET_RESULTS" --splice "$OUT_MD" ||
        die "render_fleet.py failed (results kept in $FLEET_RESULTS)"
elif ls "$RESULTS_DIR"/fleet-2*.jsonl >/dev/null 2>&1; then
    # A capacity run adds a row under the newest main run's figures.
    python3 "$HERE/render_fleet.py" --results-dir "$RESULTS_DIR" --splice "$OUT_MD" ||
        die "render_fleet.py failed (results kept in $FLEET_RESULTS)"
else
    log "no main run in $RESULTS_DIR yet: this capacity run's row appears with the next main run's section"
fi
# The section shows the newest main run and every capacity run: a main run for the repo's
# BENCHMARKS.md replaces the older main runs' files (and the capacity runs made before it).
if [[ -z "$LABEL" && "$(realpath -m "$OUT_MD")" == "$(realpath -m "$ROOT/BENCHMARKS.md")" ]]; then
    for f in "$RESULTS_DIR"/fleet-*.jsonl; do
        [[ "$f" == "$FLEET_RESULTS" ]] || rm -f "$f"
    done
fi
log "section written to $OUT_MD"
