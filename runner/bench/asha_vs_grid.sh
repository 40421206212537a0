#!/usr/bin/env bash
# Early stopping against the full grid, on the shared TinyStories sample: the same 27 configurations
# (batch_size × context_len × n_layers, equal training tokens each) swept once as a plain grid and once with
# [early_stop] method = "asha" (rungs in tokens, eta 3). Prints, for each: total tokens trained, wall time,
# the best configuration and its val loss; then the ratios.
#
#   bash runner/bench/asha_vs_grid.sh [MAX_TOKENS]      (default 196608 tokens per run)
#
# Needs ../shared/data/tinystories/sample.txt (the data is built from it with data_prep, vocab 4,096).
set -euo pipefail
cd "$(dirname "$0")/../.."
max_tokens=${1:-196608}
sample=../shared/data/tinystories/sample.txt
[ -f "$sample" ] || { echo "$sample not found: run from a checkout next to ../shared" >&2; exit 1; }
cargo build --release -q -p runner -p data_prep
work=${BENCH_DIR:-/tmp/asha_vs_grid}
rm -rf "$work" && mkdir -p "$work"
./target/release/data_prep build --input "$sample" --out "$work/data" --vocab-size 4096 >/dev/null 2>&1
min_budget=$((max_tokens / 9))
for kind in grid asha; do
  {
    printf 'name = "%s"\n[data]\ndir = "data"\n' "$kind"
    printf '[base]\ndim = 64\nn_heads = 4\nttt_mini_batch = 16\nmax_tokens = %s\nlr = 0.003\nwarmup_steps = 20\n' "$max_tokens"
    printf 'log_every = 20\neval_every = 100000\neval_batches = 8\ncheckpoint_every = 100000\n'
    printf '[sweep]\nbatch_size = [4, 8, 16]\ncontext_len = [32, 64, 128]\nn_layers = [1, 2, 3]\n'
    printf '[resources]\ndevices = ["cpu"]\nmax_parallel = 2\n'
    if [ "$kind" = asha ]; then
      printf '[early_stop]\nmethod = "asha"\nbudget = "tokens"\nmin_budget = %s\nreduction_factor = 3\n' "$min_budget"
    fi
  } > "$work/$kind.toml"
  start=$(date +%s.%N)
  ./target/release/runner --home "$work/home-$kind" sweep "$work/$kind.toml" >/dev/null 2>"$work/$kind.log"
  end=$(date +%s.%N)
  ./target/release/runner --home "$work/home-$kind" report s1 --format json > "$work/$kind.json"
  python3 - "$work/$kind.json" "$kind" "$start" "$end" <<'PY' | tee -a "$work/summary.jsonl"
import json, sys
rows = json.load(open(sys.argv[1]))
done = [r for r in rows if r["status"] == "completed"]
best = min(done, key=lambda r: r["val_loss"])
print(json.dumps({"kind": sys.argv[2], "runs": len(rows), "completed": len(done),
                  "pruned": sum(r["status"] == "pruned" for r in rows),
                  "tokens": sum(r["tokens"] for r in rows), "wall_s": round(float(sys.argv[4]) - float(sys.argv[3]), 1),
                  "best": best["params"], "best_val_loss": round(best["val_loss"], 4)}))
PY
done
python3 - "$work/summary.jsonl" "$work/grid.json" <<'PY'
import json, sys
s = {r["kind"]: r for r in map(json.loads, open(sys.argv[1]))}
grid = {json.dumps(r["params"], sort_keys=True): r["val_loss"] for r in json.load(open(sys.argv[2]))}
g, a = s["grid"], s["asha"]
same = g["best"] == a["best"]
# The grid's val loss of the configuration ASHA picked, against the grid's best.
picked = grid[json.dumps(a["best"], sort_keys=True)]
print(f"\ntokens: asha/grid = {a['tokens'] / g['tokens']:.3f}; wall time: asha/grid = {a['wall_s'] / g['wall_s']:.3f}")
print(f"best: grid {g['best']} {g['best_val_loss']}, asha {a['best']} {a['best_val_loss']} (same config: {same}; "
      f"the grid's loss of ASHA's pick is {picked / g['best_val_loss'] - 1:+.2%} from the grid's best)")
PY
