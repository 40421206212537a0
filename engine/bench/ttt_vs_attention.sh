#!/usr/bin/env bash
# Training-step time of the TTT block against attention, side by side in one run (alternating rounds):
# Bit-Llama with the authors' TTT-Linear (the default keys), the engine's first TTT definition (legacy), the
# Mamba backbone, attention with BitLinear, and float attention (Llama). Each row is `engine bench-train`
# at D=256 N=4 H=4 B=8 T=128, vocab 16,384 (the shape of train_vs_torch.sh). Prints medians and the ratio
# of each to float attention from the same binary, by median and by the fastest round (on a shared machine the
# fastest round is the least disturbed one).
#
#   bash engine/bench/ttt_vs_attention.sh [ROUNDS]
#
# ENGINE_BEFORE=/path/to/an/older/engine adds that binary's TTT and float attention rows, with its own
# definitions (e.g. one built from the commit before the authors' TTT keys: `--ttt` is not passed to it).
#
# A second table times one block and its mixer alone (forward and backward at the same shape, no embedding,
# head or optimizer around them: `engine/examples/block_bench.rs`), once per round, BLOCKS=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
threads=${THREADS:-$(nproc)}
cargo build --release -q -p engine --bin engine --example block_bench
out=$(mktemp)
blocks=$(mktemp)
rows=("ours bitttt authors" "ours bitttt legacy" "ours bitttt mamba" "ours attention authors" "ours llama authors")
if [ -n "${ENGINE_BEFORE:-}" ]; then rows+=("before bitttt -" "before llama -"); fi
for r in $(seq "$rounds"); do
  for row in "${rows[@]}"; do
    read -r who arch ttt <<<"$row"
    bin=./target/release/engine
    flags=(--ttt "$ttt")
    [ "$who" = before ] && bin=$ENGINE_BEFORE && flags=()
    RAYON_NUM_THREADS=$threads "$bin" bench-train --arch "$arch" "${flags[@]}" --steps 8 --warmup 2 \
      | sed "s/^{/{\"who\":\"$who\",\"arch\":\"$arch\",\"ttt\":\"$ttt\",\"round\":$r,/" | tee -a "$out"
  done
  if [ "${BLOCKS:-1}" != 0 ]; then
    RAYON_NUM_THREADS=$threads ./target/release/examples/block_bench | tee -a "$blocks"
  fi
done
python3 - "$out" "$blocks" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
med = {}
for r in rows:
    key = (r["who"], r["arch"], r["ttt"] if r["arch"] == "bitttt" else "-")
    if r["who"] == "before" and r["arch"] == "llama":
        key = ("before", "llama", "-")
    med.setdefault(key, []).append(r)
ref = {who: statistics.median(x["ms_per_step"] for x in med[(who, "llama", "-")])
       for who in {k[0] for k in med} if (who, "llama", "-") in med}
fastest = {who: min(x["ms_per_step"] for x in med[(who, "llama", "-")]) for who in ref}
print("\nwho     arch       ttt      ms/step  forward  backward  tok/s   vs float attention (same binary): median, fastest")
for (who, arch, ttt), rs in med.items():
    ms = statistics.median(x["ms_per_step"] for x in rs)
    f = statistics.median(x["forward_ms"] for x in rs)
    b = statistics.median(x["backward_ms"] for x in rs)
    tps = statistics.median(x["tokens_per_s"] for x in rs)
    best = min(x["ms_per_step"] for x in rs)
    print(f"{who:<7} {arch:<10} {ttt:<8} {ms:7.1f}  {f:7.1f}  {b:8.1f}  {tps:6.0f}  {ms / ref[who]:.3f}×  {best / fastest[who]:.3f}×")
blocks = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
if blocks:
    by = {}
    for r in blocks:
        by.setdefault((r["variant"], r["part"]), []).append(r)
    mid = lambda rs, k: statistics.median(x[k] for x in rs)
    print("\none block / its mixer alone, B=8 T=128 D=256 H=4 (medians over rounds of per-round medians; ms)")
    print("variant          part    forward  backward  fwd+bwd  vs attention-float (same part)")
    for (variant, part), rs in by.items():
        f, b = mid(rs, "forward_ms"), mid(rs, "backward_ms")
        ref = by[("attention-float", part)]
        total_ref = mid(ref, "forward_ms") + mid(ref, "backward_ms")
        print(f"{variant:<16} {part:<6} {f:8.2f}  {b:8.2f}  {f + b:7.2f}  {(f + b) / total_ref:.3f}×")
PY
