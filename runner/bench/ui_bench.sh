#!/usr/bin/env bash
# Dashboard benchmark (issue #17's targets): a home of RUNS runs x STEPS steps built by `runner bench-ingest`
# (the real ingest path), then, against `runner ui` on it:
#   - GET /api/runs and GET /api/runs/ID/metrics?name=loss: median of 20 requests each (curl),
#   - the sweep page drawing the curves of 100 runs in headless Chromium (ui_draw.py, real time).
# usage: bash runner/bench/ui_bench.sh   (RUNS=1000 STEPS=1000 by default; needs chromium and pip)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-1000}
STEPS=${STEPS:-1000}
PROFILE=${PROFILE:-dev}
cargo build -q --profile "$PROFILE" -p runner
BIN=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/runner
python3 -c "import websocket" 2>/dev/null || pip install -q websocket-client
WORK=$(mktemp -d)
trap 'kill $UI 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$BIN" --home "$WORK/home" bench-ingest --runs "$RUNS" --steps "$STEPS" --json > "$WORK/ingest.json"
"$BIN" --home "$WORK/home" ui --port 0 > "$WORK/ui.out" &
UI=$!
for _ in $(seq 100); do grep -q listening "$WORK/ui.out" 2>/dev/null && break; sleep 0.1; done
URL=$(grep -o 'http://[^ ]*' "$WORK/ui.out")
median_ms() {
  for _ in $(seq 20); do curl -s -o /dev/null -w '%{time_total}\n' "$1"; done |
    sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]*1000}'
}
RUNS_MS=$(median_ms "${URL}api/runs")
METRICS_MS=$(median_ms "${URL}api/runs/500/metrics?name=loss")
BYTES=$(curl -s "${URL}api/runs" | wc -c)
DRAW=$(python3 runner/bench/ui_draw.py "${URL}?sweep=s1" 5)
echo "{\"runs\": $RUNS, \"steps\": $STEPS, \"profile\": \"$PROFILE\", \"api_runs_ms\": $RUNS_MS, \"api_runs_bytes\": $BYTES, \"api_metrics_ms\": $METRICS_MS, \"browser\": $DRAW}"
