"""Compression: what each uplink codec chain buys in bytes, accuracy and simulated time.

    .venv/bin/python benchmarks/compression.py [--rounds 30] [--target 0.85]

Fashion-MNIST when its files are installed (dataset-fashion-mnist), else digits;
100 clients, Dirichlet(0.5), cohort 20, the default client settings.  For each
chain: uplink bytes, ratio to uncompressed FedAvg, final accuracy and its
difference, and simulated time to the target accuracy.  Fixed chains run on the
`uniform` fleet (10 Mbit/s uplinks); the last block compares fixed chains with
adaptive compression on `mixed_fleet` with a 2 s deadline (the adaptive policy picks
each client's least lossy rung that still uploads in time).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import fleetlearn

CHAINS = ["none", "fp16", "q8", "q4:stochastic", "ef | sign", "ef | topk:0.01 | q8", "ef | topk:0.001 | q8", "ef | sketch:0.01,cols=0.1"]


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
    args = ap.parse_args()
    data = dataset()
    print(f"dataset {data['dataset']}, {args.rounds} rounds, target {args.target}")
    print(f"{'uplink chain':<28} {'uplink bytes':>13} {'ratio':>8} {'final acc':>10} {'diff pp':>8} {'sim s to target':>16}")
    base = None
    for chain in CHAINS:
        s = run({"data": data, "server": {"rounds": args.rounds, "cohort": 20}, "compression": {"uplink": chain}})
        base = base or s
        print(f"{chain:<28} {s.uplink_bytes:>13,} {base.uplink_bytes / s.uplink_bytes:>7.1f}x {s.final_accuracy:>10.4f} "
              f"{100 * (s.final_accuracy - base.final_accuracy):>+8.2f} {time_to(s.records, args.target):>16.1f}")
    print()
    print(f"mixed_fleet, deadline 2 s, over-selection 1.3")
    print(f"{'policy':<28} {'uplink bytes':>13} {'final acc':>10} {'sim s to target':>16}")
    fleet = {"profile": "mixed_fleet", "spread": 1.0, "uplink_mbps": 2.0}
    server = {"rounds": args.rounds, "cohort": 20, "deadline_s": 2.0, "over_selection": 1.3}
    results = {}
    for chain in ["none", "q8", "q4:stochastic", "ef | topk:0.01 | q8"]:
        results[chain] = run({"data": data, "server": server, "devices": fleet, "compression": {"uplink": chain}})
    results["adaptive"] = run({"data": data, "server": server, "devices": fleet,
                               "compression": {"adaptive": True, "ladder": ["none", "q8", "q4:stochastic", "ef | topk:0.01 | q8"]}})
    for name, s in results.items():
        print(f"{name:<28} {s.uplink_bytes:>13,} {s.final_accuracy:>10.4f} {time_to(s.records, args.target):>16.1f}")


if __name__ == "__main__":
    main()
