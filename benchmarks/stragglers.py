"""Stragglers and dropouts: simulated time to a target accuracy per round policy.

    .venv/bin/python benchmarks/stragglers.py [--rounds 40] [--target 0.85] [--seeds 2]

Fleet: the `flaky` preset (log-normal speeds and bandwidths, diurnal availability,
30% mid-round dropout) with 20% of devices 10x slower.  Digits, 100 clients,
Dirichlet(0.5), cohort 20.  Policies:

- wait-for-all: no deadline (a dropout is noticed when it happens; the round waits
  for the slowest selected device);
- deadline + over-selection 1.3: select 26, keep the first 20 replies, fixed deadline;
- adaptive deadline: over-selection 1.3, deadline = 0.8-quantile of the last 3 rounds'
  completion times;
- FedBuff: 60 clients in flight, server step every 10 updates, 1/sqrt(1+s) staleness weights;
  twice the server steps of the synchronous policies, so it consumes a similar number of
  client updates;
- availability-aware (Oort) selection with the fixed deadline and over-selection 1.3.

Time to target = simulated seconds until the central test accuracy first reaches the
target.  Means over seeds.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import fleetlearn

BASE = {
    "data": {"dataset": "digits", "clients": 100, "partition": "dirichlet", "alpha": 0.5},
    "devices": {"profile": "flaky", "slow_fraction": 0.2, "slow_factor": 10.0},
}


def policies(rounds: int, deadline: float) -> dict[str, dict]:
    sync = {"rounds": rounds, "cohort": 20}
    return {
        "wait-for-all": {"server": dict(sync)},
        "deadline + over-selection 1.3": {"server": {**sync, "deadline_s": deadline, "over_selection": 1.3}},
        "adaptive deadline": {"server": {**sync, "deadline_policy": "adaptive", "deadline_quantile": 0.8, "over_selection": 1.3}},
        "FedBuff": {"server": {**sync, "rounds": 2 * rounds, "mode": "async", "concurrency": 60, "buffer_size": 10, "staleness_weight": "sqrt"}},
        "Oort + deadline": {"server": {**sync, "selector": "oort", "deadline_s": deadline, "over_selection": 1.3}},
    }


def run(rounds: int, target: float, seeds: int, deadline: float) -> list[dict]:
    rows = []
    for name, over in policies(rounds, deadline).items():
        times, finals, sims = [], [], []
        for seed in range(seeds):
            cfg = {**BASE, **over, "seed": seed}
            s = fleetlearn.run(cfg, store=False)
            times.append(s.seconds_to(target))
            finals.append(s.final_accuracy)
            sims.append(s.sim_seconds)
        rows.append({"policy": name, "time_to_target_s": float(np.mean(times)), "final_accuracy": float(np.mean(finals)), "sim_seconds": float(np.mean(sims))})
    return rows


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=1.5, help="fixed deadline, simulated seconds")
    args = ap.parse_args()
    rows = run(args.rounds, args.target, args.seeds, args.deadline)
    base = rows[0]
    print(f"target accuracy {args.target}, {args.rounds} rounds, {args.seeds} seeds")
    print(f"{'policy':<32} {'time to target (sim s)':>23} {'speed-up':>9} {'final acc':>10} {'total sim s':>12}")
    for r in rows:
        speed = base["time_to_target_s"] / r["time_to_target_s"] if math.isfinite(r["time_to_target_s"]) else 0.0
        print(f"{r['policy']:<32} {r['time_to_target_s']:>23.1f} {speed:>8.1f}x {r['final_accuracy']:>10.4f} {r['sim_seconds']:>12.1f}")


if __name__ == "__main__":
    main()
