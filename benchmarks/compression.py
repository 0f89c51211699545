"""Compression: what each uplink codec chain buys in bytes, accuracy and simulated time.

    .venv/bin/python benchmarks/compression.py [--dataset auto|default|digits|fashion_mnist] [--rounds 30]
        [--target T] [--fixed-seeds 1] [--first-seed 0] [--chains ...] [--seeds 10] [--uplink-mbps ...]
        [--ladder ...] [--pace-slack 0.05] [--skip-fixed] [--adaptive-only] [--jobs 2]

Fashion-MNIST when its files are installed (Debian's dataset-fashion-mnist), else
digits; 100 clients, Dirichlet(0.5), cohort 20.  ``--dataset default`` is `fleetlearn run`'s
own default job instead (digits, its default clients, cohort and rounds unless ``--rounds``).
A ``--chains`` entry ``target_ratio=R`` runs ``[compression] target_ratio = R`` (the chain
chosen for the model, compression/budget.py).  Client settings and target accuracy
per dataset (PRESETS): digits keeps the default client settings and target 0.85;
Fashion-MNIST (600 samples a client) trains 1 local epoch with batch 32, lr 0.05,
target 0.75 — both fixed from uncompressed FedAvg's curve before any compressed run.

First block, ``--fixed-seeds`` seeds (default 1): for each chain, uplink bytes, ratio
to uncompressed FedAvg (its uplink bytes in the same block), final accuracy and its
difference (means over the seeds; with several seeds also each seed's difference), and
simulated time to the target accuracy, on the `uniform` fleet (10 Mbit/s uplinks).

Second block, per uplink median in ``--uplink-mbps`` (Fashion-MNIST: 10, the
`mixed_fleet` default, and 2; digits: 2 and 0.5): `mixed_fleet` (log-normal
bandwidths and speeds, spread 1), 2 s deadline, over-selection 1.3.  Every fixed
chain of the adaptive ladder runs alone, then adaptive compression with the
``pace`` policy (each client the least lossy rung that finishes by the round's
earliest possible end, see fleetlearn.compression.adaptive) and, for contrast,
the ``upload_budget`` policy (least lossy rung whose upload fits the deadline
minus download and compute).  Time to target depends on the round at which a
noisy accuracy curve first crosses the target, so each policy runs with
``--seeds`` seeds (data split, fleet and selection all change with the seed) and
the table shows every seed's time, the mean, and the mean round length.
``--jobs`` runs that many simulations at once (one torch thread each); simulated
time does not depend on it.
"""

from __future__ import annotations

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import fleetlearn

CHAINS = ["none", "fp16", "q8", "q8 | zstd", "q4:stochastic", "ef | sign", "ef | topk:0.01 | q8", "ef | topk:0.01 | q8 | zstd",
          "ef | topk:0.015 | q8 | zstd", "ef | topk:0.02 | q4 | zstd", "ef | topk:0.16,block=16 | q2 | zstd", "ef | topk:0.001 | q8",
          "ef | sketch:0.01,cols=0.1"]
LADDER = ["none", "q8", "q4:stochastic", "q2:stochastic", "ef | topk:0.01 | q8"]


PRESETS = {
    # `fleetlearn run`'s own default job (digits, its default clients, rounds and cohort): --dataset default
    "default": {"client": {}, "target": 0.85, "uplink_mbps": [2.0, 0.5]},
    "digits": {"client": {}, "target": 0.85, "uplink_mbps": [2.0, 0.5]},
    "fashion_mnist": {"client": {"local_epochs": 1, "batch_size": 32, "lr": 0.05}, "target": 0.75, "uplink_mbps": [10.0, 2.0]},
}


def pick_dataset(name: str) -> str:
    if name != "auto":
        return name
    return "fashion_mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "digits"


def compression_of(chain: str) -> dict:
    """A first-block entry: an uplink chain, or ``target_ratio=R`` (the chain chosen for the model)."""
    if chain.startswith("target_ratio="):
        return {"target_ratio": float(chain.split("=", 1)[1])}
    return {"uplink": chain}


def run(cfg: dict) -> tuple[float, int, float, float, float]:
    """One simulation -> (final accuracy, uplink bytes, mean simulated round seconds, seconds to target)."""
    target = cfg.pop("target")
    torch.set_num_threads(1)
    s = fleetlearn.run({**cfg, "monitoring": {"detectors": []}}, store=False)
    return s.final_accuracy, s.uplink_bytes, float(np.mean([r.sim_seconds for r in s.records])), s.seconds_to(target)


def run_all(cfgs: list[dict], jobs: int) -> list[tuple]:
    if jobs <= 1:
        return [run(c) for c in cfgs]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run, cfgs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["auto", *PRESETS], default="auto")
    ap.add_argument("--rounds", type=int, default=None, help="default 30 (--dataset default: the job's own)")
    ap.add_argument("--target", type=float, default=None, help="accuracy to reach (default: the dataset's preset)")
    ap.add_argument("--seeds", type=int, default=10, help="seeds per policy in the mixed_fleet blocks (0: skip them)")
    ap.add_argument("--fixed-seeds", type=int, default=1, help="seeds per chain in the first (uniform fleet) block")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds of both blocks start here (held-out seeds for a confirmation run)")
    ap.add_argument("--chains", nargs="+", default=CHAINS, help="first block: these chains (the first is the baseline)")
    ap.add_argument("--uplink-mbps", type=float, nargs="+", default=None, help="median uplinks of the mixed_fleet blocks")
    ap.add_argument("--ladder", nargs="+", default=LADDER, help="mixed_fleet blocks: the adaptive ladder, least to most lossy (each rung also runs alone)")
    ap.add_argument("--skip-fixed", action="store_true", help="only the mixed_fleet blocks")
    ap.add_argument("--pace-slack", type=float, nargs="+", default=[0.05], help="one 'adaptive pace' row per value")
    ap.add_argument("--adaptive-only", action="store_true", help="mixed_fleet blocks: only the 'adaptive pace' rows")
    ap.add_argument("--jobs", type=int, default=1, help="simulations run at once")
    args = ap.parse_args()
    name = pick_dataset(args.dataset)
    preset = PRESETS[name]
    target = preset["target"] if args.target is None else args.target
    uplinks = preset["uplink_mbps"] if args.uplink_mbps is None else args.uplink_mbps
    data = {"dataset": name, "clients": 100, "partition": "dirichlet", "alpha": 0.5} if name != "default" else {}
    common = {"data": data, "client": preset["client"], "target": target}
    if name == "default":
        server = {} if args.rounds is None else {"rounds": args.rounds}
    else:
        args.rounds = args.rounds or 30
        server = {"rounds": args.rounds, "cohort": 20}
    print(f"dataset {name}, {args.rounds} rounds, target {target}, client {preset['client'] or 'defaults'}")
    if not args.skip_fixed:
        fs = list(range(args.first_seed, args.first_seed + args.fixed_seeds))
        print(f"uniform fleet, seeds {fs}; uplink bytes, final acc and time to target are means over the seeds")
        print(f"{'uplink chain':<28} {'uplink bytes':>13} {'ratio':>8} {'final acc':>10} {'diff pp':>8} {'sim s to target':>16}"
              + ("  diff pp per seed" if len(fs) > 1 else ""))
        rows = run_all([{**common, "seed": sd, "server": server, "compression": compression_of(c)}
                        for c in args.chains for sd in fs], args.jobs)
        cols = [np.array(col, dtype=np.float64) for col in zip(*rows)]
        acc, up, _, tt = (c.reshape(len(args.chains), len(fs)) for c in cols)
        for i, chain in enumerate(args.chains):
            diffs = 100 * (acc[i] - acc[0])
            per = "  " + " ".join(f"{d:+.2f}" for d in diffs) if len(fs) > 1 else ""
            print(f"{chain:<28} {up[i].mean():>13,.0f} {up[0].mean() / up[i].mean():>7.2f}x {acc[i].mean():>10.4f} "
                  f"{diffs.mean():>+8.2f} {tt[i].mean():>16.2f}{per}", flush=True)
    ladder = args.ladder
    policies: dict[str, dict] = {} if args.adaptive_only else {c: {"uplink": c} for c in ladder}
    for slack in args.pace_slack:
        label = "adaptive pace" if args.pace_slack == [0.05] else f"adaptive pace slack={slack:g}"
        policies[label] = {"adaptive": True, "adaptive_policy": "pace", "pace_slack": slack, "ladder": ladder}
    if not args.adaptive_only:
        policies["adaptive upload_budget"] = {"adaptive": True, "adaptive_policy": "upload_budget", "ladder": ladder}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for mbps in uplinks if seeds else []:  # --seeds 0: the first block only
        print()
        print(f"mixed_fleet, uplink median {mbps:g} Mbit/s, deadline 2 s, over-selection 1.3, seeds {seeds}; ladder {' ; '.join(ladder)}")
        print(f"{'policy':<24} {'uplink MB':>10} {'final acc':>10} {'mean round s':>13} {'s to target, per seed':>32} {'mean':>7}")
        fleet = {"profile": "mixed_fleet", "spread": 1.0, "uplink_mbps": mbps}
        server = {"rounds": args.rounds or 30, "cohort": 20, "deadline_s": 2.0, "over_selection": 1.3}
        cfgs = [{**common, "seed": sd, "server": server, "devices": fleet, "compression": comp} for comp in policies.values() for sd in seeds]
        results = run_all(cfgs, args.jobs)
        for i, label in enumerate(policies):
            rows = results[i * len(seeds):(i + 1) * len(seeds)]
            acc, up, rnd, tt = (np.array(col, dtype=np.float64) for col in zip(*rows))
            per = " ".join(f"{t:.2f}" for t in tt)
            print(f"{label:<24} {up.mean() / 1e6:>10.3f} {acc.mean():>10.4f} {rnd.mean():>13.3f} {per:>32} {tt.mean():>7.2f}", flush=True)


if __name__ == "__main__":
    main()
