#!/usr/bin/env bash
# The scaling-study benchmark: trains an IsoFLOP study twice — its stable phases reused by forks (WSD), and
# every cell separately — then reports
#   (a) FLOPs spent with reuse against the same grid trained separately (goal ≤ 0.45×),
#   (b) the frontier exponent a of the reused study against the separate study's interval,
#   (c) the loss the reused study's law predicts for a model trained at 3× the largest budget, against the
#       loss measured by training it (goal within 3%),
#   (d) the groups' laws side by side (`--group-by mixer`: Bit-Llama's ternary TTT against float attention).
# Usage: bash runner/bench/scaling.sh [SWEEP_FILE] [--set sweep.KEY=VALUE ...]
#   (default experiments/scaling.toml; BENCH_HOME=folder for the runs, default a fresh temporary one)
set -euo pipefail
cd "$(dirname "$0")/../.."
FILE=${1:-experiments/scaling.toml}
shift || true
SETS=("$@")
BENCH_HOME=${BENCH_HOME:-$(mktemp -d /tmp/bitllama-scaling.XXXXXX)}
cargo build --release -q -p runner
R=(target/release/runner --home "$BENCH_HOME")
echo "== $(date -u +%FT%TZ) on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), home $BENCH_HOME"
t0=$(date +%s)
"${R[@]}" sweep "$FILE" "${SETS[@]}" > "$BENCH_HOME/reused.txt" 2>&1
t1=$(date +%s)
"${R[@]}" sweep "$FILE" "${SETS[@]}" --set sweep.reuse=false > "$BENCH_HOME/separate.txt" 2>&1
t2=$(date +%s)
echo "study with reuse: $((t1 - t0)) s wall; every cell separately: $((t2 - t1)) s wall"
"${R[@]}" report s1 --format json > "$BENCH_HOME/s1.json"
"${R[@]}" report s2 --format json > "$BENCH_HOME/s2.json"
"${R[@]}" scaling s1 --group-by mixer --format json > "$BENCH_HOME/fit1.json"
"${R[@]}" scaling s2 --group-by mixer --format json > "$BENCH_HOME/fit2.json"
python3 - "$BENCH_HOME" <<'PY'
import json, sys
home = sys.argv[1]
def spent(rows):
    # FLOPs a run trained itself: a fork's steps before its fork point were its parent's.
    total = 0.0
    for r in rows:
        if r["status"] != "completed" or not r.get("flops_per_token"):
            continue
        per_step = r["tokens"] / max(r["step"], 1)
        own = r["tokens"] - (r.get("fork_step") or 0) * per_step
        total += r["flops_per_token"] * own
    return total
s1 = json.load(open(f"{home}/s1.json")); s2 = json.load(open(f"{home}/s2.json"))
a1, a2 = spent(s1), spent(s2)
print(f"(a) FLOPs spent: reused {a1:.3e}, separately {a2:.3e}: {a1 / a2:.3f}× (goal ≤ 0.45×)")
fits2 = {g["name"]: g for g in json.load(open(f"{home}/fit2.json"))["groups"]}
for f1 in json.load(open(f"{home}/fit1.json"))["groups"]:
    f2 = fits2.get(f1["name"], {})
    if f1.get("frontier") and f2.get("frontier"):
        a, (lo, hi) = f1["frontier"]["a"], f2["frontier"]["a_ci"]
        inside = "inside" if lo <= a <= hi else "outside"
        print(f"(b) {f1['name']}: exponent a reused {a:.3f}; separate {f2['frontier']['a']:.3f} [{lo:.3f}, {hi:.3f}]: {inside}")
    else:
        print(f"(b) {f1['name']}: no frontier —", "; ".join(f1.get("problems", []) + f2.get("problems", [])))
PY
# (c) Bit-Llama's law (the reused study's mixer=ttt runs) at 3× its largest budget: the compute-optimal size among the study's sizes
# (the sweep's dims), trained on the tokens that budget buys, against what the law predicts for that N and D.
python3 - "$BENCH_HOME" > "$BENCH_HOME/predict.env" <<'PY'
import json, sys, math
home = sys.argv[1]
rows = [r for r in json.load(open(f"{home}/s1.json"))
        if r["status"] == "completed" and r["params"].get("mixer") == "ttt"]
fit = next(g for g in json.load(open(f"{home}/fit1.json"))["groups"] if g["name"] == "mixer=ttt")
budget = 3 * max(r["budget"] for r in rows)
law, fr = fit.get("law"), fit.get("frontier")
if not (law and fr):
    print("SKIP=1"); sys.exit()
n_opt = math.exp(fr["ka"] + fr["a"] * math.log(budget))
# The study's size closest to N_opt (in log), and its FLOPs per token.
best = min(rows, key=lambda r: abs(math.log(r["params_non_embedding"] / n_opt)))
dim = best["params"]["dim"]
print(f"BUDGET={budget:e}\nDIM={dim}\nN={best['params_non_embedding']}\nFPT={best['flops_per_token']}")
print(f"E={law['E']}\nA={law['A']}\nALPHA={law['alpha']}\nB={law['B']}\nBETA={law['beta']}\nN_OPT={n_opt}")
PY
# shellcheck disable=SC1091
source "$BENCH_HOME/predict.env"
if [ "${SKIP:-0}" = 1 ]; then
  echo "(c) no prediction: the reused study has no law or frontier (see runner scaling s1)"
else
  "${R[@]}" sweep "$FILE" "${SETS[@]}" --set "sweep.budgets=[$BUDGET]" --set "sweep.dim=[$DIM]" \
    --set sweep.min_tokens_per_param=0 --set 'sweep.variants=[{ mixer = "ttt", weights = "ternary" }]' \
    --set resources.max_parallel=1 \
    > "$BENCH_HOME/predict.txt" 2>&1
  "${R[@]}" report s3 --format json > "$BENCH_HOME/s3.json"
  python3 - "$BENCH_HOME" "$BUDGET" "$N" "$FPT" "$E" "$A" "$ALPHA" "$B" "$BETA" "$N_OPT" <<'PY'
import json, sys
home, c, n, fpt, E, A, al, B, be, n_opt = sys.argv[1], *map(float, sys.argv[2:])
rows = [r for r in json.load(open(f"{home}/s3.json")) if r["status"] == "completed"]
for r in rows:
    d = r["tokens"]
    pred = E + A / n ** al + B / d ** be
    got = r["val_loss"]
    print(f"(c) at {c:.3e} FLOPs (N_opt {n_opt:.3e}; trained the study's nearest size N = {n:.0f}, D = {d}): "
          f"predicted {pred:.4f}, measured {got:.4f} ({r['params'].get('mixer', '')}): {abs(got / pred - 1) * 100:.2f}% off (goal ≤ 3%)")
PY
fi
echo "(d) the groups side by side:"
"${R[@]}" scaling s1 --group-by mixer
