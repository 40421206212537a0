#!/usr/bin/env bash
# The GPU check, run on the device machine in one call (prepared by engine/bench/gpu_prepare.sh into DIR):
#  1. `engine train` D=512 N=8 H=8 B=32 T=128, 50 steps, f32, on cuda:0: tokens/s;
#  2. the same for 20 steps with ENGINE_DIST_BACKEND=nccl (world size 1 through NCCL): losses must equal 1.,
#     and the all-reduce time per step (the step events' extra.allreduce_ms) against the step time;
#  3. `engine bench-train` (random tokens, as the peer) in f32 and bf16 mixed precision;
#  4. the PyTorch peer, same config, fp32 and bf16 autocast, eager.
# Prints a table last. DEVICE=cpu runs the same script on a CPU build (a dry run of the script itself).
#   bash engine/bench/gpu_check.sh [DIR]
set -uo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.gpu}
device=${DEVICE:-cuda:0}
steps=${STEPS:-50}
pre=(); [ "$device" = cpu ] || pre=(bash "$dir/run-on-device.sh")
out=$(mktemp -d)
cfg="$out/run.toml"
cat >"$cfg" <<TOML
data_dir = "$(cd "$dir/data" && pwd)"
dim = ${DIM:-512}
n_layers = ${LAYERS:-8}
n_heads = ${HEADS:-8}
batch_size = ${BATCH:-32}
context_len = ${CTX:-128}
steps = $steps
log_every = 1
eval_every = 1000000
checkpoint_every = 1000000
device = "$device"
TOML
tps() { grep '"event":"step"' "$1" | tail -n 10 | python3 -c 'import sys,json; v=[json.loads(l)["tokens_per_s"] for l in sys.stdin]; print(round(sum(v)/max(1,len(v))))'; }
ar_ms() { grep '"event":"step"' "$1" | tail -n 10 | python3 -c 'import sys,json; v=[json.loads(l).get("extra",{}).get("allreduce_ms") for l in sys.stdin]; v=[x for x in v if x is not None]; print(round(sum(v)/len(v),3) if v else "none")'; }
losses() { grep '"event":"step"' "$1" | python3 -c 'import sys,json; print(" ".join("%.6f" % json.loads(l)["loss"] for l in sys.stdin))'; }

timeout 240 "${pre[@]}" "$dir/engine" train --config "$cfg" --out "$out/f32" >"$out/f32.jsonl" 2>"$out/f32.err"
echo "engine f32: exit $?"; tail -n 3 "$out/f32.err"
ENGINE_DIST_BACKEND=nccl timeout 120 "${pre[@]}" "$dir/engine" train --config "$cfg" --out "$out/nccl" --set steps=20 \
  >"$out/nccl.jsonl" 2>"$out/nccl.err"
echo "engine nccl world 1: exit $?"; tail -n 3 "$out/nccl.err"
a=$(losses "$out/f32.jsonl" | cut -d' ' -f1-20); b=$(losses "$out/nccl.jsonl")
same=$([ -n "$a" ] && [ "$a" = "$b" ] && echo yes || echo NO)
ours=""
for dt in f32 bf16; do
  r=$(timeout 120 "${pre[@]}" "$dir/engine" bench-train --arch bitttt --dim ${DIM:-512} --layers ${LAYERS:-8} \
    --heads ${HEADS:-8} --batch ${BATCH:-32} --ctx ${CTX:-128} --steps 20 --warmup 3 --device "$device" --dtype $dt 2>&1 | tail -n 1)
  ours="$ours
engine bench-train $dt: $(echo "$r" | python3 -c 'import sys,json; d=json.loads(sys.stdin.read() or "{}"); print(round(d.get("tokens_per_s", 0)))' 2>/dev/null || echo "failed: $r")"
done
peer=""
if [ -f "$dir/bitllama_torch.py" ]; then
  py=${PYTHON:-/opt/torch/.venv/bin/python}; [ -x "$py" ] || py=python3
  pdev=$([ "$device" = cpu ] && echo cpu || echo cuda)
  for dt in fp32 bf16; do
    r=$(timeout 120 "$py" "$dir/bitllama_torch.py" --device "$pdev" --dtype $dt --arch bitttt --dim ${DIM:-512} \
      --layers ${LAYERS:-8} --heads ${HEADS:-8} --batch ${BATCH:-32} --ctx ${CTX:-128} --steps 20 --warmup 3 2>/dev/null | tail -n 1)
    peer="$peer
peer $dt: $(echo "$r" | python3 -c 'import sys,json; d=json.loads(sys.stdin.read() or "{}"); print(round(d.get("tokens_per_s", 0)))' 2>/dev/null)"
  done
fi
echo "=== GPU check ($device, D${DIM:-512} N${LAYERS:-8} B${BATCH:-32} T${CTX:-128})"
echo "engine f32 tokens/s (mean of last 10 steps): $(tps "$out/f32.jsonl")"
echo "NCCL world-size-1 losses equal to plain run over 20 steps: $same"
echo "NCCL run: gradient all-reduce $(ar_ms "$out/nccl.jsonl") ms per step (mean of last 10) at $(tps "$out/nccl.jsonl") tokens/s = $(python3 -c "t=$(tps "$out/nccl.jsonl"); print(round(${BATCH:-32}*${CTX:-128}/t*1e3,1) if t else 'n/a')") ms per step"
echo "$ours"
echo "$peer"
