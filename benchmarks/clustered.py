"""Clustered FL on planted clusters: IFCA and CFL against one FedAvg model.

    python benchmarks/clustered.py                       # groups 2 and 4, seeds 0-2 (a few minutes)
    python benchmarks/clustered.py --groups 2 --seeds 0  # one quick row per method

The problem: digits split IID over `--clients` clients; client c is in group c % g and
every group but group 0 sees the labels through its own random permutation
(`data.partition = "label_permutation"`, `data.groups = g`).  One model cannot fit
conflicting labelings; a model per group can.  Each round trains `--cohort` clients.

Columns: ARI, the adjusted Rand index between the planted groups and the clusters every
client is in at the end (the evaluator's choice: lowest training loss among the clusters
the server allows it); clusters, models in use at the end; local acc, the mean over all
clients of the accuracy of its cluster's model on its local test split (FedAvg: the one
model's), at the last round and the best round; rounds to target, the first round whose
local accuracy reaches --target; MB up / down over the run; wall s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fleetlearn.clustering import adjusted_rand_index
from fleetlearn.config import load_config
from fleetlearn.data.partition import planted_groups
from fleetlearn.engine import build_coordinator


def config(method: str, groups: int, seed: int, args) -> dict:
    server = {"rounds": args.rounds, "cohort": args.cohort, "eval_clients": 0}
    if method == "ifca":
        server.update(clustering="ifca", clusters=groups)
    elif method == "cfl":
        server.update(clustering="cfl", clusters=args.cfl_max_clusters, cfl_eps1=args.cfl_eps1, cfl_eps2=args.cfl_eps2)
    return {
        "seed": seed,
        "data": {"dataset": "digits", "clients": args.clients, "partition": "label_permutation", "groups": groups},
        "client": {"local_epochs": args.local_epochs},
        "server": server,
        "monitoring": {"debug": False, "detectors": []},
    }


def one_run(method: str, groups: int, seed: int, args) -> dict:
    t0 = time.perf_counter()
    coord = build_coordinator(load_config(config(method, groups, seed, args)), store=False)
    summary = coord.run()
    wall = time.perf_counter() - t0
    fed = np.array([r.fed_accuracy for r in summary.records])
    reached = np.flatnonzero(fed >= args.target)
    ev = coord.evaluator
    truth = planted_groups(args.clients, groups)[ev.clients]
    choice = getattr(ev, "last_choice", np.zeros(len(ev.clients), dtype=np.int64))
    return {
        "ari": adjusted_rand_index(truth, choice),
        "clusters": summary.records[-1].clusters or 1,
        "acc": float(fed[-1]),
        "best": float(fed.max()),
        "rounds": int(reached[0]) + 1 if reached.size else None,
        "up": summary.uplink_bytes / 1e6,
        "down": summary.downlink_bytes / 1e6,
        "wall": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--cohort", type=int, default=20)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--cfl-max-clusters", type=int, default=4)
    p.add_argument("--cfl-eps1", type=float, default=0.7)  # the config defaults
    p.add_argument("--cfl-eps2", type=float, default=2.0)
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"digits, {args.clients} clients, cohort {args.cohort}, {args.rounds} rounds, {args.local_epochs} local epochs, "
        f"cfl_eps1 {args.cfl_eps1}, cfl_eps2 {args.cfl_eps2}, target local acc {args.target}; mean (min-max) over seeds {args.seeds}"
    )
    print("| groups | method | ARI | clusters | local acc (last) | local acc (best) | rounds to target | MB up | MB down | wall s |")
    print("|---:|---|---|---|---|---:|---|---:|---:|---:|")
    for g in args.groups:
        for method in ("fedavg", "ifca", "cfl"):
            runs = [one_run(method, g, s, args) for s in args.seeds]

            def stat(key, fmt="{:.3f}"):
                v = np.array([r[key] for r in runs], dtype=float)
                return fmt.format(v.mean()) + (f" ({fmt.format(v.min())}-{fmt.format(v.max())})" if len(v) > 1 else "")

            rounds = [r["rounds"] for r in runs]
            rounds_s = " ".join("-" if x is None else str(x) for x in rounds)
            clusters = " ".join(str(r["clusters"]) for r in runs)
            print(
                f"| {g} | {method} | {stat('ari', '{:.2f}')} | {clusters} | {stat('acc')} | {np.mean([r['best'] for r in runs]):.3f} | {rounds_s} | "
                f"{np.mean([r['up'] for r in runs]):.1f} | {np.mean([r['down'] for r in runs]):.1f} | {np.mean([r['wall'] for r in runs]):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
