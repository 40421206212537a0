#!/usr/bin/env bash
# Batch-1 generation: `engine bench-generate` (packed ternary + quantized tables vs our f32 path) and the
# PyTorch peer's decode (engine/bench/torch_decode.py: the peer's eager model, full-prefix recompute per
# token, as it has no decode cache), same config, same machine, alternating, ROUNDS times.
#
#   bash engine/bench/generate_vs_torch.sh [ROUNDS] [DIM LAYERS HEADS]
#
# Needs ../shared/bench and PyTorch (a venv at $TORCH_VENV, default /tmp/torchenv, made when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-1}
d=${2:-768}; l=${3:-12}; h=${4:-12}
venv=${TORCH_VENV:-/tmp/torchenv}
threads=${THREADS:-$(nproc)}
[ -f ../shared/bench/bitllama_torch.py ] || { echo "../shared/bench/bitllama_torch.py not found" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch
fi
cargo build --release -q -p engine
for r in $(seq "$rounds"); do
  RAYON_NUM_THREADS=$threads ./target/release/engine bench-generate --dim "$d" --n-layers "$l" --n-heads "$h" --json
  OMP_NUM_THREADS=$threads "$venv/bin/python" -W ignore engine/bench/torch_decode.py --dim "$d" --layers "$l" \
    --heads "$h" --threads "$threads" 2>/dev/null
done
