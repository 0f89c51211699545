"""Central DP-FedAvg on digits: epsilon and accuracy for noise multipliers 0.5 to 2.0.

    python benchmarks/privacy.py              # 30 rounds, z in 0.5 0.75 1 1.5 2, plus the non-private run (~1-2 min on 2 cores)
    python benchmarks/privacy.py --quick      # 15 rounds
    python benchmarks/privacy.py --clip-norm 2.0 --noise-multipliers 1.0

The embedded default job (digits, 100 clients, Dirichlet 0.5, cohort 20, the MLP,
10 local epochs) with ``[privacy] mode = "central"``: each round clips every
client's update to C, sums, adds N(0, (z C)^2) and divides by the expected cohort
(McMahan et al., ICLR 2018).  Epsilon is what the run itself reports after its
last round (`RoundRecord.extra["dp_epsilon"]`, PLD accounting with dp-accounting,
q = cohort / population = 0.2, delta = 1e-5 < 1 / population); the RDP and PLD
columns are `benchmarks/privacy_accounting.py`'s own computation for the same
(q, z, rounds, delta) and must agree with the run's PLD number.

Clip norm: the non-private run is made first and its update norms are printed
(median over every accepted update of every round).  With the default client
settings the median is about 1 (3 in round 1, 0.7 by round 30), and a sweep of
C in {0.5, 1, 2} at z = 0.5 and z = 1 put C = 1 best, so C = 1.0 is the default.
(Choosing C from the non-private run's norms is itself a use of the data that a
real deployment would have to account for, or replace with adaptive clipping.)

"accuracy" is the mean central test accuracy of the last 5 rounds (one round's
value moves by +-1-2 pp on the 360-example test set); the last round's is printed too.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from privacy_accounting import NOISE_MULTIPLIERS, accounting_table, format_table  # noqa: E402

from fleetlearn.config import load_config  # noqa: E402
from fleetlearn.data import load_federated  # noqa: E402
from fleetlearn.engine import build_coordinator  # noqa: E402

LAST = 5
POPULATION, COHORT = 100, 20


def settings(rounds: int, seed: int, noise_multiplier: float | None, clip_norm: float, delta: float) -> dict:
    cfg = {
        "seed": seed,
        "data": {"dataset": "digits", "clients": POPULATION},
        "server": {"rounds": rounds, "cohort": COHORT},
        "monitoring": {"debug": False, "detectors": []},
    }
    if noise_multiplier is not None:
        cfg["privacy"] = {"mode": "central", "noise_multiplier": noise_multiplier, "clip_norm": clip_norm, "delta": delta, "accounting": "pld"}
    return cfg


def run_one(cfg: dict, data) -> dict:
    t0 = time.perf_counter()
    summary = build_coordinator(load_config(cfg), store=False, data=data).run()
    recs = summary.records
    accs = [r.accuracy for r in recs if not math.isnan(r.accuracy)]
    norms = [c.update_norm for r in recs for c in r.clients if c.status == "accepted"]
    return {
        "accuracy": float(np.mean(accs[-LAST:])),
        "last": float(accs[-1]),
        "epsilon_run": float(recs[-1].extra.get("dp_epsilon", math.inf)),
        "rounds_run": len(recs),
        "norms": np.asarray(norms),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="15 rounds")
    p.add_argument("--rounds", type=int, default=None, help="default 30 (15 with --quick)")
    p.add_argument("--noise-multipliers", type=float, nargs="+", default=list(NOISE_MULTIPLIERS))
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="accuracy averaged over these seeds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny batched models: 1 is fastest)")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    print("$ " + shlex.join(["python", "benchmarks/privacy.py", *argv]))
    torch.set_num_threads(a.threads)
    rounds = a.rounds or (15 if a.quick else 30)
    q = COHORT / POPULATION
    print(
        f"central DP-FedAvg: digits, {POPULATION} clients, Dirichlet 0.5, cohort {COHORT} (q = {q:g}), {rounds} rounds, "
        f"clip_norm C = {a.clip_norm:g}, delta = {a.delta:g}, seeds {a.seeds}\n",
        flush=True,
    )
    t0 = time.perf_counter()
    datasets = {s: load_federated(load_config(settings(rounds, s, None, a.clip_norm, a.delta)).data, s) for s in a.seeds}

    def averaged(z: float | None) -> dict:
        runs = [run_one(settings(rounds, s, z, a.clip_norm, a.delta), datasets[s]) for s in a.seeds]
        out = {k: float(np.mean([r[k] for r in runs])) for k in ("accuracy", "last", "epsilon_run", "seconds")}
        out["rounds_run"] = min(r["rounds_run"] for r in runs)
        out["norms"] = np.concatenate([r["norms"] for r in runs])
        label = "non-private" if z is None else f"z = {z:g}"
        print(f"  {label:<12} accuracy {out['accuracy']:.3f}  last {out['last']:.3f}  epsilon {out['epsilon_run']:.3f}  ({out['seconds']:.1f}s)", file=sys.stderr, flush=True)
        return out

    base = averaged(None)
    p10, p50, p90 = np.percentile(base["norms"], [10, 50, 90])
    print(f"non-private update norms (every accepted update, every round): p10 {p10:.2f}, median {p50:.2f}, p90 {p90:.2f}; C = {a.clip_norm:g}\n")

    rows = accounting_table(a.noise_multipliers, q, rounds, a.delta)
    for row, z in zip(rows, a.noise_multipliers):
        r = averaged(z)
        if r["rounds_run"] != rounds:
            print(f"warning: z = {z:g} stopped after {r['rounds_run']} rounds", file=sys.stderr)
        row.update(accuracy=r["accuracy"], last=r["last"], epsilon_run=r["epsilon_run"])
    rows.append({"noise_multiplier": 0.0, "epsilon_rdp": math.inf, "epsilon_pld": math.inf, "epsilon_run": math.inf, "accuracy": base["accuracy"], "last": base["last"]})
    wall = time.perf_counter() - t0
    print(format_table(rows, [("epsilon_run", "epsilon (run, PLD)", "{:.3f}"), ("accuracy", "accuracy (last 5)", "{:.3f}"), ("last", "accuracy (last round)", "{:.3f}")]))
    print("\nz = 0 is the non-private baseline (no clipping, no noise).")
    worst = max((abs(r["epsilon_run"] - r["epsilon_pld"]) / r["epsilon_pld"] for r in rows[:-1]), default=0.0)
    print(f"run-reported vs dp-accounting PLD epsilon: max relative difference {worst:.2e}")
    print(f"\n{len(rows) * len(a.seeds)} runs in {wall:.0f} s wall")
    return rows


if __name__ == "__main__":
    main()
