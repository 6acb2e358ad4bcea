#!/usr/bin/env bash
# The cost of [metrics] (issue 14's target: cold and warm throughput with metrics on within 3 %
# of metrics off): bench/ab.sh with one spiffed build on both sides, "old" with metrics off and
# "new" with [metrics] on and scraped every SCRAPE_EVERY seconds (1, fifteen times as often as
# Prometheus' default) during every load. The new/old column of the table is the cost.
#
#   bench/metrics-cost.sh                       # builds spiffed (dist) and the loadgen first
#   BIN=/path/to/spiffed LOADGEN=/path/to/spiffed-loadgen bench/metrics-cost.sh
#
# Knobs: RUNS (5), SECONDS_PER_RUN (10), METRICS_PORT (19988), SCRAPE_EVERY (1), FANOUT_RUNS (0:
# the fan-out is left out; set it to include it), STARTUP_RUNS (0), PROFILE (dist),
# LOADGEN_PROFILE (loadgen), CARGO_TARGET_DIR (target). A smoke run: RUNS=1 SECONDS_PER_RUN=2.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PROFILE="${PROFILE:-dist}"
LOADGEN_PROFILE="${LOADGEN_PROFILE:-loadgen}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PORT="${METRICS_PORT:-19988}"

if [[ -z "${BIN:-}" ]]; then
    BIN="$(CARGO_TARGET_DIR="$TARGET_DIR" "$ROOT/packaging/build-ordered.sh" "$PROFILE")"
fi
if [[ -z "${LOADGEN:-}" ]]; then
    (cd "$ROOT" && cargo build --profile "$LOADGEN_PROFILE" -p spiffed-loadgen)
    LOADGEN="$TARGET_DIR/$LOADGEN_PROFILE/spiffed-loadgen"
fi

OLD="$BIN" NEW="$BIN" LOADGEN="$LOADGEN" \
    RUNS="${RUNS:-5}" SECONDS_PER_RUN="${SECONDS_PER_RUN:-10}" \
    FANOUT_RUNS="${FANOUT_RUNS:-0}" STARTUP_RUNS="${STARTUP_RUNS:-0}" \
    NEW_EXTRA="$(printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$PORT")" \
    NEW_SCRAPE="http://127.0.0.1:$PORT/metrics" \
    "$HERE/ab.sh"
echo "old = metrics off, new = [metrics] on and scraped every ${SCRAPE_EVERY:-1}s" >&2
