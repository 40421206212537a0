#!/usr/bin/env bash
# CPU all-reduce between 2 local processes: `engine bench-allreduce` (TCP ring) against PyTorch's gloo backend
# (engine/bench/gloo_allreduce.py), 1M and 16M floats, alternating ROUNDS times, median of 5 each.
#   bash engine/bench/allreduce_vs_gloo.sh [ROUNDS]      (torch venv: $TORCH_VENV, default /tmp/torchenv)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
venv=${TORCH_VENV:-/tmp/torchenv}
[ -x "$venv/bin/python" ] || { python3 -m venv "$venv"; "$venv/bin/pip" install -q torch; }
cargo build --release -q -p engine
for r in $(seq "$rounds"); do
  RAYON_NUM_THREADS=1 ./target/release/engine bench-allreduce --world 2 --iters 5
  "$venv/bin/python" engine/bench/gloo_allreduce.py 5 2>/dev/null
done
