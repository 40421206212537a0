#!/usr/bin/env bash
# Our TPE sampler against Optuna's TPESampler and both against random search, side by side on standard
# synthetic objectives (a 1-D log-lr bowl, Branin, Hartmann-6), the same trial budgets and 30 seeds each:
# the median over seeds of the best value found after 20, 40 and 80 trials (lower is better), and a
# Mann–Whitney test of ours against Optuna at each budget (A > 0.5: ours finds lower values more often).
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

# Are the two implementations' distributions different? Mann–Whitney U per objective and budget (normal
# approximation with the tie correction): A = P(ours finds a lower best than Optuna) + ½ P(tie), 0.5 = alike;
# p = two-sided. Random vs random calibrates the test (the two should look alike).
import math
def mann_whitney(a, b):
    pooled = sorted((v, i) for i, v in enumerate(a + b))
    ranks, i = [0.0] * len(pooled), 0
    ties = 0.0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[pooled[k][1]] = (i + j) / 2 + 1
        ties += (j - i + 1) ** 3 - (j - i + 1)
        i = j + 1
    n1, n2 = len(a), len(b)
    u = sum(ranks[:n1]) - n1 * (n1 + 1) / 2          # pairs where a is above b
    mu, n = n1 * n2 / 2, n1 + n2
    sd = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    z = (u - mu) / sd if sd > 0 else 0.0
    p = math.erfc(abs(z) / math.sqrt(2))
    return 1 - u / (n1 * n2), p                        # A = P(a below b) + ½ ties
print(f"\n{'objective':<10} {'samplers':<16} " + " ".join(f"{'A@' + str(b) + ' (p)':>15}" for b in rows[0]["budgets"]))
for obj in dict.fromkeys(r["objective"] for r in rows):
    for sampler in ("tpe", "random"):
        ours = [r for r in rows if r["objective"] == obj and r["sampler"] == sampler and r["who"] == "ours"]
        theirs = [r for r in rows if r["objective"] == obj and r["sampler"] == sampler and r["who"] == "optuna"]
        if not ours or not theirs:
            continue
        cells = []
        for i in range(len(rows[0]["budgets"])):
            a, p = mann_whitney([s[i] for s in ours[0]["best"]], [s[i] for s in theirs[0]["best"]])
            cells.append(f"{a:.2f} ({p:.2f})")
        print(f"{obj:<10} {sampler + ' vs optuna':<16} " + " ".join(f"{c:>15}" for c in cells))
PY
