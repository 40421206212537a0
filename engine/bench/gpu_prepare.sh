#!/usr/bin/env bash
# Prepare the one-call GPU check (engine/bench/gpu_check.sh) on this CPU machine: a stripped CUDA engine, a small
# data dir, the PyTorch peer and the device-side library helper, all in DIR (default .gpu, git-ignored), so that
# one device call `bash engine/bench/gpu_check.sh` with carry [".gpu"] runs everything.
#   bash engine/bench/gpu_prepare.sh [DIR]      (needs ../shared; first CUDA build ~10 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.gpu}
mkdir -p "$dir"
cargo fetch -q
bash .ci/cuda/setup-cuda.sh /tmp/cuda13 >/dev/null
(
  # shellcheck disable=SC1091
  source .ci/cuda/env.sh /tmp/cuda13
  cargo build --release -q -p engine --features cuda --target-dir target/cuda
)
strip -o "$dir/engine" target/cuda/release/engine
cargo build --release -q -p data_prep
if [ ! -f "$dir/data/meta.json" ]; then
  if [ -f ../shared/data/tinystories/sample.txt ]; then
    ./target/release/data_prep build --input ../shared/data/tinystories/sample.txt --out "$dir/data" --vocab-size 16384
  else
    ./target/release/data_prep synth --out "$dir/synth.txt" --stories 3000
    ./target/release/data_prep build --input "$dir/synth.txt" --out "$dir/data" --vocab-size 16384
  fi
fi
cp ../shared/gpu/run-on-device.sh "$dir/"
cp ../shared/bench/bitllama_torch.py "$dir/" 2>/dev/null || true
du -sh "$dir"
