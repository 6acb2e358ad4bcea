#!/usr/bin/env bash
# SDS fan-out against the Workload API fan-out on one spiffed (issue 14's target: a rotation
# reaches 10,000 open SDS streams within the same budget as Workload API streams). One agent,
# one entry with a short X.509 TTL; each run waits for a rotation, opens the streams, and
# times the next rotation's arrival at every stream (`spiffed-loadgen fanout` and `sds-fanout`,
# [default, ROOTCA] as Istio asks). The two kinds alternate which goes first per run. The
# side-by-side with spire-agent's SDS is in compare-spire.sh; this one isolates spiffed's two
# APIs in one quick run (about RUNS x 2 x (TTL/2 + 10) s).
#
#   CARGO_TARGET_DIR=/path bench/sds-vs-wlapi.sh     # builds spiffed (dist) and the loadgen
#   BIN=... LOADGEN=... bench/sds-vs-wlapi.sh
#
# Knobs: RUNS (5), STREAMS (10000), CONNECTIONS (100), TTL (20, seconds), PROFILE (dist),
# LOADGEN_PROFILE (loadgen). Output: bench/results/sds-vs-wlapi-<UTC>.jsonl and a table.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PROFILE="${PROFILE:-dist}"
LOADGEN_PROFILE="${LOADGEN_PROFILE:-loadgen}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
RUNS="${RUNS:-5}" STREAMS="${STREAMS:-10000}" CONNECTIONS="${CONNECTIONS:-100}" TTL="${TTL:-20}"
for v in RUNS STREAMS CONNECTIONS TTL; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]] || [[ "${!v}" -lt 1 ]]; then
        echo "sds-vs-wlapi.sh: $v must be a positive integer, got '${!v}'" >&2
        exit 2
    fi
done
if [[ -z "${BIN:-}" ]]; then
    BIN="$(CARGO_TARGET_DIR="$TARGET_DIR" "$ROOT/packaging/build-ordered.sh" "$PROFILE")"
fi
if [[ -z "${LOADGEN:-}" ]]; then
    (cd "$ROOT" && cargo build --locked --profile "$LOADGEN_PROFILE" -p spiffed-loadgen)
    LOADGEN="$TARGET_DIR/$LOADGEN_PROFILE/spiffed-loadgen"
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

TMP="$(mktemp -d)"
PID=""
cleanup() {
    if [[ -n "$PID" ]]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
mkdir -p "$TMP/data" "$TMP/admin" "$HERE/results"
cat >"$TMP/spiffed.toml" <<CONF
trust_domain = "example.org"
socket_path = "$TMP/api.sock"
admin_socket_path = "$TMP/admin/admin.sock"
data_dir = "$TMP/data"
log_level = "warn"

[[entries]]
spiffe_id = "spiffe://example.org/bench"
selectors = ["unix:uid:$(id -u)"]
x509_svid_ttl = "${TTL}s"
CONF
"$BIN" run --config "$TMP/spiffed.toml" >"$TMP/spiffed.log" 2>&1 &
PID=$!
for _ in $(seq 100); do [[ -S "$TMP/api.sock" ]] && break; sleep 0.1; done
[[ -S "$TMP/api.sock" ]] || { cat "$TMP/spiffed.log" >&2; echo "sds-vs-wlapi.sh: spiffed did not start" >&2; exit 1; }

OUT="$HERE/results/sds-vs-wlapi-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
echo "{\"scenario\":\"meta\",\"commit\":\"$(git -C "$ROOT" rev-parse --short HEAD)\",\"runs\":$RUNS,\"streams\":$STREAMS,\"connections\":$CONNECTIONS,\"ttl_s\":$TTL,\"nproc\":$(nproc)}" >"$OUT"
one() {
    python3 "$HERE/wlapi.py" rotation "$TMP/api.sock" --timeout "$((TTL + 20))" >/dev/null \
        || echo "sds-vs-wlapi.sh: no rotation seen before a $1 run" >&2
    "$LOADGEN" "$1" --socket "$TMP/api.sock" --streams "$STREAMS" --connections "$CONNECTIONS" \
        --agent-pid "$PID" --timeout "$((TTL + 30))s" --allow-errors >>"$OUT"
}
for ((r = 1; r <= RUNS; r++)); do
    if ((r % 2)); then one fanout; one sds-fanout; else one sds-fanout; one fanout; fi
    echo "run $r/$RUNS done" >&2
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
meta = rows[0]
print(f"commit {meta['commit']}, {meta['runs']} runs of {meta['streams']} streams over {meta['connections']} connections, nproc {meta['nproc']}")
print("| API | first->last update ms (median, range) | agent CPU per updated stream us | agent RSS with the streams open MiB | errors |")
print("|---|---|---|---|---|")
for sc, name in (("fanout", "Workload API"), ("sds_fanout", "SDS [default, ROOTCA]")):
    rs = [r for r in rows if r.get("scenario") == sc]
    if not rs:
        continue
    t = [r["first_to_last_update_ms"] for r in rs if r.get("first_to_last_update_ms") is not None]
    c = [r["agent_cpu_per_stream_us"] for r in rs if r.get("agent_cpu_per_stream_us") is not None]
    m = [r["agent_ready"]["rss_kib"] / 1024 for r in rs]
    e = sum(sum(r["errors"].values()) + (1 if r["timed_out"] else 0) for r in rs)
    f = lambda xs: f"{statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f})" if xs else "-"
    print(f"| {name} | {f(t)} | {f(c)} | {f(m)} | {e} |")
PY
echo "raw: $OUT" >&2
