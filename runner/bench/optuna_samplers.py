"""Optuna's TPESampler and RandomSampler on the objectives of `runner bench-sampler` (same spaces, same
budgets, same number of seeds); prints the same JSON lines with "who": "optuna"."""
import json
import math
import sys

import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)

ALPHA = [1.0, 1.2, 3.0, 3.2]
A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
P = [[0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886], [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
     [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650], [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381]]


def log_bowl(t):
    return (math.log10(t.suggest_float("lr", 1e-5, 1.0, log=True)) + 3.0) ** 2


def branin(t):
    x1, x2 = t.suggest_float("x1", -5, 10), t.suggest_float("x2", 0, 15)
    b, c, s, tt = 5.1 / (4 * math.pi ** 2), 5 / math.pi, 10, 1 / (8 * math.pi)
    return (x2 - b * x1 * x1 + c * x1 - 6) ** 2 + s * (1 - tt) * math.cos(x1) + s


def hartmann6(t):
    x = [t.suggest_float(f"x{i}", 0, 1) for i in range(6)]
    return -sum(ALPHA[i] * math.exp(-sum(A[i][j] * (x[j] - P[i][j]) ** 2 for j in range(6))) for i in range(4))


def main():
    budgets = [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "20,40,80").split(",")]
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    for name, f in [("log_bowl", log_bowl), ("branin", branin), ("hartmann6", hartmann6)]:
        for sampler in ["tpe", "random"]:
            best = []
            for seed in range(seeds):
                s = optuna.samplers.TPESampler(seed=seed) if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
                study = optuna.create_study(sampler=s)
                study.optimize(f, n_trials=max(budgets))
                values = [tr.value for tr in study.trials]
                best.append([min(values[:b]) for b in budgets])
            print(json.dumps({"who": "optuna", "objective": name, "sampler": sampler, "budgets": budgets, "best": best}))


main()
