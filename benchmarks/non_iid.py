"""Non-IID data: FedAvg, FedProx, SCAFFOLD, FedAdam, FedYogi and FedAvgM on two skewed problems.

    .venv/bin/python benchmarks/non_iid.py [--rounds 60] [--seeds 3] [--problems digits,synthetic]

Problems (same rounds, same seeds, same cohorts and local work for every method):

- digits: scikit-learn's 8x8 digits, 100 clients, Dirichlet(0.1) label skew, MLP [128];
  cohort 10 per round, 20 local SGD steps of batch 8, lr 0.05, no local momentum.
  Target: 0.85 central test accuracy.
- synthetic: Synthetic(1, 1) exactly as in FedProx (Li et al., MLSys 2020): 30 devices with
  their own models and feature distributions (`partition = "natural"`), logistic regression;
  cohort 10, 20 local steps of batch 10, lr 0.01, no local momentum.  Target: 0.80.

Methods (per-method hyper-parameters below in METHODS, chosen per problem by the best
mean accuracy over rounds 36-40 of a 40-round run on seed 0, over server_lr in
{0.01, 0.03, 0.1, 0.3} for FedAdam/FedYogi, mu in {0.01, 0.1, 1} for FedProx, server_lr in
{0.3, 1} with momentum 0.9 for FedAvgM; FedAvg and SCAFFOLD have nothing to tune here):

- FedAvg: mean of the deltas, server_lr 1.
- FedProx: proximal term mu/2 ||w - w_global||^2.
- SCAFFOLD: option II control variates (client.objective = "scaffold"); server_lr 1.
- FedAdam / FedYogi: Reddi et al. 2021, beta1 0.9, beta2 0.99, tau 1e-3.
- FedAvgM: server momentum 0.9.

Rounds to target = the first round whose central test accuracy reaches the target
(">R" if none does), per seed; final accuracy = the central accuracy after
the last round, and the mean over the last 5 rounds, both averaged over seeds.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import fleetlearn

PROBLEMS = {
    "digits": {
        "target": 0.85,
        "config": {
            "data": {"dataset": "digits", "clients": 100, "partition": "dirichlet", "alpha": 0.1},
            "model": {"name": "mlp", "hidden": [128]},
            "client": {"local_steps": 20, "batch_size": 8, "lr": 0.05, "momentum": 0.0},
            "server": {"cohort": 10},
        },
    },
    "synthetic": {
        "target": 0.80,
        "config": {
            "data": {"dataset": "synthetic", "partition": "natural", "synthetic_alpha": 1.0, "synthetic_beta": 1.0},
            "model": {"name": "logistic"},
            "client": {"local_steps": 20, "batch_size": 10, "lr": 0.01, "momentum": 0.0},
            "server": {"cohort": 10},
        },
    },
    # Not in the default run: Synthetic(1,1) with 5x the local work at 5x the lr (more client
    # drift), where FedProx's proximal term should matter most (--problems synthetic_drift).
    "synthetic_drift": {
        "target": 0.80,
        "config": {
            "data": {"dataset": "synthetic", "partition": "natural", "synthetic_alpha": 1.0, "synthetic_beta": 1.0},
            "model": {"name": "logistic"},
            "client": {"local_steps": 100, "batch_size": 10, "lr": 0.05, "momentum": 0.0},
            "server": {"cohort": 10},
        },
    },
}

# Per-method overrides, per problem (see the module docstring for how they were chosen).
METHODS = {
    "FedAvg": {"digits": {}, "synthetic": {}},
    "FedProx": {
        "digits": {"client": {"objective": "prox", "prox_mu": 0.01}},
        "synthetic": {"client": {"objective": "prox", "prox_mu": 0.01}},
        "synthetic_drift": {"client": {"objective": "prox", "prox_mu": 1.0}},  # FedProx's Synthetic choice
    },
    "SCAFFOLD": {"digits": {"client": {"objective": "scaffold"}}, "synthetic": {"client": {"objective": "scaffold"}}},
    "FedAdam": {
        "digits": {"server": {"optimizer": "adam", "server_lr": 0.1}},
        "synthetic": {"server": {"optimizer": "adam", "server_lr": 0.03}},
    },
    "FedYogi": {
        "digits": {"server": {"optimizer": "yogi", "server_lr": 0.1}},
        "synthetic": {"server": {"optimizer": "yogi", "server_lr": 0.03}},
    },
    "FedAvgM": {
        "digits": {"server": {"optimizer": {"name": "momentum", "momentum": 0.9}, "server_lr": 1.0}},
        "synthetic": {"server": {"optimizer": {"name": "momentum", "momentum": 0.9}, "server_lr": 0.3}},
    },
}


def merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def describe(over: dict) -> str:
    flat = [f"{k}={v}" for sec in over.values() for k, v in sec.items()]
    return ", ".join(flat) or "-"


def settings(method: str, problem: str) -> dict:
    """The method's overrides for `problem` (synthetic_drift borrows synthetic's unless it has its own)."""
    m = METHODS[method]
    return m[problem] if problem in m else m["synthetic"]


def run_one(problem: str, method: str, rounds: int, seed: int, over: dict | None = None) -> list[float]:
    cfg = merge(PROBLEMS[problem]["config"], over if over is not None else settings(method, problem))
    cfg = merge(cfg, {"server": {"rounds": rounds}, "monitoring": {"debug": False, "detectors": []}})
    cfg["seed"] = seed
    summary = fleetlearn.run(cfg, store=False)
    return [r.accuracy for r in summary.records]


def rounds_to(accs: list[float], target: float) -> float:
    for i, a in enumerate(accs, 1):
        if not math.isnan(a) and a >= target:
            return i
    return math.inf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--problems", default="digits,synthetic")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for problem in args.problems.split(","):
        target = PROBLEMS[problem]["target"]
        print(f"\n### {problem} (target {target:.2f}, {args.rounds} rounds, seeds 0..{args.seeds - 1})\n")
        print("| method | settings | rounds to target (per seed) | final acc (per seed) | final acc | last-5 mean |")
        print("|---|---|---:|---:|---:|---:|")
        for method in args.methods.split(","):
            runs = [run_one(problem, method, args.rounds, s) for s in range(args.seeds)]
            hits = [rounds_to(a, target) for a in runs]
            to = ", ".join(f">{args.rounds}" if math.isinf(h) else f"{h:.0f}" for h in hits)
            final = float(np.mean([a[-1] for a in runs]))
            last5 = float(np.mean([np.nanmean(a[-5:]) for a in runs]))
            per = ", ".join(f"{a[-1]:.3f}" for a in runs)
            print(f"| {method} | {describe(settings(method, problem))} | {to} | {per} | {final:.4f} | {last5:.4f} |", flush=True)
    print(f"\n(wall {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
