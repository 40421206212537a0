#!/usr/bin/env bash
# Our TPE sampler against Optuna's TPESampler and both against random search, side by side on standard
# synthetic objectives (a 1-D log-lr bowl, Branin, Hartmann-6), the same trial budgets and 30 seeds each:
# the median over seeds of the best value found after 20, 40 and 80 trials (lower is better).
#
#   bash runner/bench/tpe_vs_optuna.sh [SEEDS]
#
# Optuna comes from PyPI into a venv at $OPTUNA_VENV (default /tmp/optenv), created when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
seeds=${1:-30}
venv=${OPTUNA_VENV:-/tmp/optenv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q optuna
fi
cargo build --release -q -p runner
out=$(mktemp)
./target/release/runner bench-sampler --seeds "$seeds" --budgets 20,40,80 > "$out"
"$venv/bin/python" runner/bench/optuna_samplers.py 20,40,80 "$seeds" >> "$out"
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'objective':<10} {'sampler':<14} " + " ".join(f"{'best@' + str(b):>11}" for b in rows[0]["budgets"]))
for obj in dict.fromkeys(r["objective"] for r in rows):
    for r in [r for r in rows if r["objective"] == obj]:
        med = [statistics.median(s[i] for s in r["best"]) for i in range(len(r["budgets"]))]
        print(f"{obj:<10} {r['who'] + ' ' + r['sampler']:<14} " + " ".join(f"{m:>11.5f}" for m in med))
PY
