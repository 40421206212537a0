#!/usr/bin/env bash
# Training-step throughput of the engine against the PyTorch peer (../shared/bench/bitllama_torch.py),
# measured side by side, alternating runs, on the same machine. Prints one JSON line per run and a summary.
#
#   bash engine/bench/train_vs_torch.sh [ROUNDS] [DIMxLAYERSxHEADSxBATCHxCTX ...]
#
# Needs the peer (../shared/bench) and PyTorch: a venv at $TORCH_VENV (default /tmp/torchenv) is created with
# `pip install torch` (CPU wheel) when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
shift || true
configs=("${@:-256x4x4x8x128}")
peer=../shared/bench/bitllama_torch.py
venv=${TORCH_VENV:-/tmp/torchenv}
threads=${THREADS:-$(nproc)}
if [ ! -f "$peer" ]; then echo "peer $peer not found: run from a checkout next to ../shared" >&2; exit 1; fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch
fi
cargo build --release -q -p engine
out=$(mktemp)
for cfg in "${configs[@]}"; do
  IFS=x read -r d l h b t <<<"$cfg"
  for arch in bitttt llama; do
    for r in $(seq "$rounds"); do
      RAYON_NUM_THREADS=$threads ./target/release/engine bench-train --arch $arch --dim $d --layers $l --heads $h \
        --batch $b --ctx $t --steps 10 --warmup 3 | sed "s/^{/{\"who\":\"ours\",\"arch\":\"$arch\",/" | tee -a "$out"
      OMP_NUM_THREADS=$threads "$venv/bin/python" "$peer" --device cpu --dtype fp32 --arch $arch --dim $d --layers $l \
        --heads $h --batch $b --ctx $t --steps 10 --warmup 3 --threads $threads \
        | sed "s/^{/{\"who\":\"torch\",\"arch\":\"$arch\",/" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
keys = sorted({(r["arch"], r.get("dim"), r.get("batch"), r.get("ctx")) for r in rows if r["who"] == "ours"})
print("\narch    D    B   T    ours tok/s  torch tok/s  ours/torch  ours peak RSS MiB  torch peak MiB")
for arch, d, b, t in keys:
    pick = lambda who: [r for r in rows if r["who"] == who and r["arch"] == arch and r.get("dim", d) == d]
    o, p = pick("ours"), pick("torch")
    om = statistics.median(r["tokens_per_s"] for r in o)
    pm = statistics.median(r["tokens_per_s"] for r in p) if p else float("nan")
    orss = max(r["peak_mem_bytes"] for r in o) / 2**20
    prss = max(r.get("peak_mem_bytes", 0) for r in p) / 2**20 if p else float("nan")
    print(f"{arch:7} {d:4} {b:3} {t:4} {om:11.0f} {pm:12.0f} {om/pm:10.2f}x {orss:17.0f} {prss:15.0f}")
ck = [r for r in rows if r["who"] == "ours"]
print(f"\ncheckpoint write {statistics.median(r['checkpoint_write_s'] for r in ck):.3f} s, "
      f"load {statistics.median(r['checkpoint_load_s'] for r in ck):.3f} s "
      f"({statistics.median(r['checkpoint_bytes'] for r in ck)/2**20:.1f} MiB)")
PY
