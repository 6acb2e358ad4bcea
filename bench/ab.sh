#!/usr/bin/env bash
# A/B: two spiffed builds side by side with the scenarios of BENCHMARKS.md (spiffed only, no SPIRE),
# to show that a change keeps every figure within noise.
#
#   OLD=/path/to/old/spiffed NEW=/path/to/new/spiffed bench/ab.sh
#
# Both agents get the same config (entry set A: unix:uid:<your uid>) in their own temp data dir;
# runs alternate (old 1, new 1, new 2, old 2, old 3, ...) and medians over RUNS are printed as a markdown table
# (raw JSON lines in bench/results/ab-<UTC>.jsonl), with the agent's CPU per call (user + system
# CPU of every thread over the run, from /proc/PID/stat, divided by the calls served): on a
# shared machine far steadier than calls/s, which also move with the load generator's scheduling. LOADGEN is the loadgen binary (default: the
# one next to NEW). Knobs: RUNS (3), SECONDS_PER_RUN (5), FANOUT_STREAMS (10000), FANOUT_CONNS
# (100), FANOUT_TTL (60), STARTUP_RUNS (3), FANOUT_RUNS (RUNS; 0 skips the fan-out), FANOUT_SDS
# (1: each fan-out run is followed, on the same agent, by an SDS fan-out; 0 skips it).
# OLD_EXTRA / NEW_EXTRA: TOML appended to that side's config (e.g. a [metrics] table), and
# OLD_SCRAPE / NEW_SCRAPE: a URL fetched every SCRAPE_EVERY seconds (1) while that side is under
# load (e.g. its /metrics), so that a side with metrics on also pays for being scraped.
# bench/metrics-cost.sh runs it for the cost of [metrics] (one build, metrics off vs on).
set -euo pipefail

: "${OLD:?set OLD to the old spiffed binary}"
: "${NEW:?set NEW to the new spiffed binary}"
LOADGEN="${LOADGEN:-$(dirname "$NEW")/spiffed-loadgen}"
# OLD_LOADGEN / NEW_LOADGEN: a loadgen per side (default LOADGEN), to A/B the load generator
# itself against one agent build (OLD=NEW).
OLD_LOADGEN="${OLD_LOADGEN:-$LOADGEN}"
NEW_LOADGEN="${NEW_LOADGEN:-$LOADGEN}"
RUNS="${RUNS:-3}"
SECS="${SECONDS_PER_RUN:-5}"
FANOUT_STREAMS="${FANOUT_STREAMS:-10000}"
FANOUT_CONNS="${FANOUT_CONNS:-100}"
FANOUT_TTL="${FANOUT_TTL:-60}"
STARTUP_RUNS="${STARTUP_RUNS:-3}"
FANOUT_RUNS="${FANOUT_RUNS:-$RUNS}"
FANOUT_SDS="${FANOUT_SDS:-1}"
SCRAPE_EVERY="${SCRAPE_EVERY:-1}"
OLD_EXTRA="${OLD_EXTRA:-}"
NEW_EXTRA="${NEW_EXTRA:-}"
OLD_SCRAPE="${OLD_SCRAPE:-}"
NEW_SCRAPE="${NEW_SCRAPE:-}"
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/results/ab-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
TMP="$(mktemp -d)"
AGENT_PID=""
SCRAPER_PID=""
TICKS_PER_S="$(getconf CLK_TCK)"

cleanup() {
    [[ -n "$SCRAPER_PID" ]] && kill "$SCRAPER_PID" 2>/dev/null
    [[ -n "$AGENT_PID" ]] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
ulimit -n "$(ulimit -Hn)"
mkdir -p "$HERE/results"
: >"$OUT"

emit() { printf '%s\n' "$1" >>"$OUT"; }

config() {
    local name="$1" ttl="$2" extra="$OLD_EXTRA"
    [[ "$name" == new ]] && extra="$NEW_EXTRA"
    mkdir -p "$TMP/$name"
    cat >"$TMP/$name/spiffed.toml" <<EOF
trust_domain = "example.org"
socket_path = "$TMP/$name/api.sock"
admin_socket_path = "$TMP/$name/admin/admin.sock"
data_dir = "$TMP/$name/data"
log_level = "info"
max_streams_per_uid = 200000
[[entries]]
spiffe_id = "spiffe://example.org/bench/uid"
selectors = ["unix:uid:$(id -u)"]
x509_svid_ttl = "${ttl}s"
$extra
EOF
}

# start NAME BIN: starts the agent (stopped before exec, so the probe times the start-up) and
# records the start-up and the idle RSS 2 s later.
start() {
    local name="$1" bin="$2" out rss
    rm -f "$TMP/$name/api.sock"
    (
        kill -STOP "$BASHPID"
        exec "$bin" run --new-trust-root --config "$TMP/$name/spiffed.toml" </dev/null >>"$TMP/$name/log" 2>&1
    ) &
    AGENT_PID=$!
    out="$(python3 "$HERE/wlapi.py" startup --pid "$AGENT_PID" --socket "$TMP/$name/api.sock" --timeout 60)"
    sleep 2
    rss="$(awk '/VmRSS/ {print $2}' "/proc/$AGENT_PID/status")"
    emit "{\"agent\":\"$name\",\"case\":\"startup\",\"result\":$out,\"idle_rss_kib\":$rss}"
}

stop() {
    kill "$AGENT_PID" && wait "$AGENT_PID" 2>/dev/null || true
    AGENT_PID=""
}

# scrape_start NAME: fetches that side's *_SCRAPE URL every SCRAPE_EVERY s in the background
# (failures are written to $TMP/NAME/scrapes).
scrape_start() {
    local url="$OLD_SCRAPE"
    [[ "$1" == new ]] && url="$NEW_SCRAPE"
    [[ -z "$url" ]] && return 0
    python3 -c '
import sys, time, urllib.request
url, every = sys.argv[1], float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(url, timeout=5).read()
    except Exception as e:
        print("scrape failed:", e, flush=True)
    time.sleep(every)
' "$url" "$SCRAPE_EVERY" >>"$TMP/$1/scrapes" 2>&1 &
    SCRAPER_PID=$!
}

scrape_stop() {
    if [[ -n "$SCRAPER_PID" ]]; then
        kill "$SCRAPER_PID" 2>/dev/null || true
        wait "$SCRAPER_PID" 2>/dev/null || true
    fi
    SCRAPER_PID=""
}

# cpu_ticks: the agent's user + system CPU so far, in clock ticks (all its threads).
cpu_ticks() {
    # Fields after the command name, which ends at the last ')': utime is the 12th, stime the 13th.
    local stat
    stat="$(cat "/proc/$AGENT_PID/stat")"
    stat="${stat##*) }"
    awk '{ print $12 + $13 }' <<<"$stat"
}

load() {
    local name="$1" case="$2"
    shift 2
    local line before after cpu_ms
    scrape_start "$name"
    before="$(cpu_ticks)"
    local loadgen="$OLD_LOADGEN"
    [[ "$name" == new ]] && loadgen="$NEW_LOADGEN"
    line="$("$loadgen" "$@" --socket "$TMP/$name/api.sock" --allow-errors | tail -n 1)"
    after="$(cpu_ticks)"
    scrape_stop
    cpu_ms=$(((after - before) * 1000 / TICKS_PER_S))
    emit "{\"agent\":\"$name\",\"case\":\"$case\",\"agent_cpu_ms\":$cpu_ms,\"result\":$line}"
}

for name in old new; do config "$name" 3600; done
for r in $(seq 1 "$RUNS"); do
    # The side that goes first alternates between runs, so that neither always runs right
    # after the other's load (or always first after start).
    order=(old new)
    ((r % 2 == 0)) && order=(new old)
    for name in "${order[@]}"; do
        bin="$OLD"; [[ "$name" == new ]] && bin="$NEW"
        echo "run $r: $name" >&2
        start "$name" "$bin"
        load "$name" cold cold --concurrency 16 --seconds "$SECS"
        load "$name" cold_c1 cold --concurrency 1 --seconds "$SECS"
        load "$name" warm_jwt warm --rpc jwt --concurrency 16 --seconds "$SECS"
        load "$name" warm_x509 warm --rpc x509 --concurrency 16 --seconds "$SECS"
        stop
    done
done
for r in $(seq 1 "$STARTUP_RUNS"); do
    for name in old new; do
        bin="$OLD"; [[ "$name" == new ]] && bin="$NEW"
        start "$name" "$bin"
        stop
    done
done
for name in old new; do config "$name" "$FANOUT_TTL"; rm -rf "$TMP/$name/data"; done
for r in $(seq 1 "$FANOUT_RUNS"); do
    for name in old new; do
        bin="$OLD"; [[ "$name" == new ]] && bin="$NEW"
        echo "fan-out run $r: $name" >&2
        start "$name" "$bin"
        load "$name" fanout fanout --streams "$FANOUT_STREAMS" --connections "$FANOUT_CONNS" \
            --agent-pid "$AGENT_PID" --timeout 90s
        if [[ "$FANOUT_SDS" == 1 ]]; then
            # The same agent's next rotation, to SDS streams ([default, ROOTCA], each ACKed).
            load "$name" sds_fanout sds-fanout --streams "$FANOUT_STREAMS" \
                --connections "$FANOUT_CONNS" --agent-pid "$AGENT_PID" --timeout 90s
        fi
        stop
    done
done
python3 "$HERE/ab_table.py" "$OUT"
echo "raw: $OUT" >&2
for name in old new; do
    if [[ -s "$TMP/$name/scrapes" ]]; then
        echo "$name: $(grep -c 'scrape failed' "$TMP/$name/scrapes") scrapes failed, e.g.: $(head -n 1 "$TMP/$name/scrapes")" >&2
    fi
done
