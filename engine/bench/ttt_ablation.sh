#!/usr/bin/env bash
# Quality at equal wall time: Bit-Llama (TTT + ternary) with each of the authors' TTT-Linear details on and off,
# against float attention, all trained for the same number of seconds on the shared TinyStories sample, two
# runs at a time (one core each). Prints a table of held-out val loss / bits per byte and the ratio to float
# attention.
#
#   bash engine/bench/ttt_ablation.sh [SECONDS] [VARIANT ...]
#
# Variants (default: all): authors legacy no_token_eta no_lr_bias no_inner_rope no_post_norm legacy_eps mamba
# attention_ternary attention_float. Model: D=256 N=4 H=4, vocab 4,096, batch 16 × context 128, lr 3e-3
# (cosine to 3e-4 over the steps the seconds allow is not known in advance: the rate stays at lr after warm-up),
# seed $SEED (default 0); the final eval covers 16 batches of 8 held-out windows. Needs ../shared (the sample).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-240}
seed=${SEED:-0}
shift || true
variants=("${@:-authors legacy no_token_eta no_lr_bias no_inner_rope no_post_norm legacy_eps mamba attention_ternary attention_float}")
read -r -a variants <<<"${variants[*]}"
sample=../shared/data/tinystories/sample.txt
[ -f "$sample" ] || { echo "$sample not found: run from a checkout next to ../shared" >&2; exit 1; }
work=${ABLATION_DIR:-/tmp/bitllama-ablation}
mkdir -p "$work"
cargo build --release -q -p engine -p data_prep
data=$work/data
if [ ! -f "$data/meta.json" ]; then
  ./target/release/data_prep build --input "$sample" --out "$data" --vocab-size 4096 >/dev/null
fi

keys() {
  case $1 in
    authors) ;;
    legacy) echo 'ttt_token_eta = "none"'; echo 'ttt_lr_bias = false'; echo 'ttt_inner_rope = false'
            echo 'ttt_post_norm = false'; echo 'norm_eps = 1e-5'; echo 'quant_eps = "add"' ;;
    no_token_eta) echo 'ttt_token_eta = "none"' ;;
    no_lr_bias) echo 'ttt_lr_bias = false' ;;
    no_inner_rope) echo 'ttt_inner_rope = false' ;;
    no_post_norm) echo 'ttt_post_norm = false' ;;
    legacy_eps) echo 'norm_eps = 1e-5'; echo 'quant_eps = "add"' ;;
    mamba) echo 'ttt_backbone = "mamba"' ;;
    attention_ternary) echo 'mixer = "attention"' ;;
    attention_float) echo 'mixer = "attention"'; echo 'weights = "float"' ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

train() {
  local v=$1 dir=$work/runs-s$seed/$1
  rm -rf "$dir" && mkdir -p "$dir"
  {
    echo "data_dir = \"$data\""
    echo 'dim = 256'; echo 'n_layers = 4'; echo 'n_heads = 4'; echo 'batch_size = 16'; echo 'context_len = 128'
    echo "max_seconds = $seconds"; echo 'lr = 0.003'; echo 'warmup_steps = 30'; echo 'min_lr = 0.0003'
    echo 'eval_every = 1000000'; echo 'eval_batches = 16'; echo 'checkpoint_every = 1000000'; echo "seed = $seed"
    keys "$v"
  } >"$dir/run.toml"
  RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 ./target/release/engine train --config "$dir/run.toml" \
    --out "$dir/run" >"$dir/stdout.jsonl" 2>"$dir/stderr.txt"
}

# Two at a time, one core each.
for ((i = 0; i < ${#variants[@]}; i += 2)); do
  train "${variants[i]}" &
  if ((i + 1 < ${#variants[@]})); then train "${variants[i + 1]}" & fi
  wait
done

python3 - "$work/runs-s$seed" "$seconds" "${variants[@]}" <<'PY'
import json, sys
root, seconds, names = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = {}
for n in names:
    ev = [json.loads(l) for l in open(f"{root}/{n}/stdout.jsonl") if l.startswith("{")]
    done = [e for e in ev if e.get("event") == "done"]
    start = [e for e in ev if e.get("event") == "start"]
    if not done:
        print(f"{n}: no done event (see {root}/{n}/stderr.txt)"); continue
    d = done[-1]
    rows[n] = (d["val_loss"], d["val_bpb"], d["step"], start[0].get("params") if start else None)
ref = rows.get("attention_float")
print(f"\nheld-out after {seconds} s of training each (2 runs at a time, 1 core each), {root}")
print("| variant | steps | val loss | val bits/byte | vs float attention |")
print("|---|---|---|---|---|")
for n, (loss, bpb, step, params) in rows.items():
    ratio = f"{bpb / ref[1]:.3f}×" if ref else "-"
    print(f"| {n} | {step} | {loss:.4f} | {bpb:.4f} | {ratio} |")
print(json.dumps({"seconds": float(seconds), "rows": {n: {"val_loss": r[0], "val_bpb": r[1], "steps": r[2]} for n, r in rows.items()}}))
PY
