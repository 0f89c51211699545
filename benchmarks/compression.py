"""Compression: what each uplink codec chain buys in bytes, accuracy and simulated time.

    .venv/bin/python benchmarks/compression.py [--rounds 30] [--target 0.85] [--seeds 5] [--uplink-mbps 2 0.5]
        [--pace-slack 0.05] [--skip-fixed] [--adaptive-only]

Fashion-MNIST when its files are installed (dataset-fashion-mnist), else digits;
100 clients, Dirichlet(0.5), cohort 20, the default client settings.

First block, one seed: for each chain, uplink bytes, ratio to uncompressed FedAvg
(its uplink bytes in the same block), final accuracy and its difference, and
simulated time to the target accuracy, on the `uniform` fleet (10 Mbit/s uplinks).

Second block, per uplink median in ``--uplink-mbps``: `mixed_fleet` (log-normal
bandwidths and speeds, spread 1), 2 s deadline, over-selection 1.3.  Every fixed
chain of the adaptive ladder runs alone, then adaptive compression with the
``pace`` policy (each client the least lossy rung that finishes by the round's
earliest possible end, see fleetlearn.compression.adaptive) and, for contrast,
the ``upload_budget`` policy (least lossy rung whose upload fits the deadline
minus download and compute).  Time to target depends on the round at which a
noisy accuracy curve first crosses the target, so each policy runs with
``--seeds`` seeds (data split, fleet and selection all change with the seed) and
the table shows every seed's time, the mean, and the mean round length.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

import fleetlearn

CHAINS = ["none", "fp16", "q8", "q8 | zstd", "q4:stochastic", "ef | sign", "ef | topk:0.01 | q8", "ef | topk:0.01 | q8 | zstd",
          "ef | topk:0.001 | q8", "ef | sketch:0.01,cols=0.1"]
LADDER = ["none", "q8", "q4:stochastic", "q2:stochastic", "ef | topk:0.01 | q8"]


def dataset() -> dict:
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        return {"dataset": "fashion_mnist", "clients": 100, "partition": "dirichlet", "alpha": 0.5}
    return {"dataset": "digits", "clients": 100, "partition": "dirichlet", "alpha": 0.5}


def time_to(records, target: float) -> float:
    t = 0.0
    for r in records:
        t += r.sim_seconds
        if not math.isnan(r.accuracy) and r.accuracy >= target:
            return t
    return math.inf


def run(cfg: dict) -> fleetlearn.RunSummary:
    return fleetlearn.run({**cfg, "monitoring": {"detectors": []}}, store=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--seeds", type=int, default=5, help="seeds per policy in the mixed_fleet block")
    ap.add_argument("--uplink-mbps", type=float, nargs="+", default=[2.0, 0.5], help="median uplinks of the mixed_fleet blocks")
    ap.add_argument("--skip-fixed", action="store_true", help="only the mixed_fleet blocks")
    ap.add_argument("--pace-slack", type=float, nargs="+", default=[0.05], help="one 'adaptive pace' row per value")
    ap.add_argument("--adaptive-only", action="store_true", help="mixed_fleet blocks: only the 'adaptive pace' rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = dataset()
    print(f"dataset {data['dataset']}, {args.rounds} rounds, target {args.target}")
    if not args.skip_fixed:
        print(f"{'uplink chain':<28} {'uplink bytes':>13} {'ratio':>8} {'final acc':>10} {'diff pp':>8} {'sim s to target':>16}")
        base = None
        for chain in CHAINS:
            s = run({"data": data, "server": {"rounds": args.rounds, "cohort": 20}, "compression": {"uplink": chain}})
            base = base or s
            print(f"{chain:<28} {s.uplink_bytes:>13,} {base.uplink_bytes / s.uplink_bytes:>7.2f}x {s.final_accuracy:>10.4f} "
                  f"{100 * (s.final_accuracy - base.final_accuracy):>+8.2f} {time_to(s.records, args.target):>16.2f}", flush=True)
    policies: dict[str, dict] = {} if args.adaptive_only else {c: {"uplink": c} for c in LADDER}
    for slack in args.pace_slack:
        name = "adaptive pace" if args.pace_slack == [0.05] else f"adaptive pace slack={slack:g}"
        policies[name] = {"adaptive": True, "adaptive_policy": "pace", "pace_slack": slack, "ladder": LADDER}
    if not args.adaptive_only:
        policies["adaptive upload_budget"] = {"adaptive": True, "adaptive_policy": "upload_budget", "ladder": LADDER}
    seeds = list(range(args.seeds))
    for mbps in args.uplink_mbps:
        print()
        print(f"mixed_fleet, uplink median {mbps:g} Mbit/s, deadline 2 s, over-selection 1.3, seeds {seeds}; ladder {' ; '.join(LADDER)}")
        print(f"{'policy':<24} {'uplink MB':>10} {'final acc':>10} {'mean round s':>13} {'s to target, per seed':>32} {'mean':>7}")
        fleet = {"profile": "mixed_fleet", "spread": 1.0, "uplink_mbps": mbps}
        server = {"rounds": args.rounds, "cohort": 20, "deadline_s": 2.0, "over_selection": 1.3}
        for name, comp in policies.items():
            rows = [run({"seed": sd, "data": data, "server": server, "devices": fleet, "compression": comp}) for sd in seeds]
            tt = np.array([time_to(s.records, args.target) for s in rows])
            up = np.mean([s.uplink_bytes for s in rows]) / 1e6
            acc = np.mean([s.final_accuracy for s in rows])
            rnd = np.mean([np.mean([r.sim_seconds for r in s.records]) for s in rows])
            per = " ".join(f"{t:.2f}" for t in tt)
            print(f"{name:<24} {up:>10.3f} {acc:>10.4f} {rnd:>13.3f} {per:>32} {tt.mean():>7.2f}", flush=True)


if __name__ == "__main__":
    main()
