"""`[compression] target_ratio = 100`'s two chains against float32, round by round.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/target_ratio_curves.py default|fashion_mnist
        [--seeds 12] [--jobs 2] [--json FILE]

For each seed: float32 FedAvg, block top-k with error feedback (``ef | topk:1.0,block=16 |
q2:stochastic | zstd | budget:N``, what target_ratio runs where the run cannot average by
coverage) and random subsets averaged by coverage (``subset:1.0,block=16 | q2:stochastic |
zstd | budget:N``, what it runs otherwise), N = 4 d / 100.  ``default`` is `fleetlearn run`'s
default job (digits, 20 rounds, cohort 30 of 100); ``fashion_mnist`` the compression
benchmark's (Dirichlet 0.5, 100 clients, cohort 20, 30 rounds, 1 local epoch, lr 0.05).
Prints, for the final round and for the mean of the last 3 and 5 rounds, each chain's
difference to float32 (pp; mean, sd and standard error over the seeds, seeds 0-2, every
seed) and the paired difference between the two chains: the final round alone is one
noisy snapshot.  Accuracy only, so the machine's load does not matter.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np

BUDGET = {"default": 384, "fashion_mnist": 4070}  # 4 d / 100 for the two jobs' MLPs (9,610 and 101,770 parameters)


def chains(dataset: str) -> dict[str, dict]:
    n = BUDGET[dataset]
    return {"float32": {}, "topk+ef": {"uplink": f"ef | topk:1.0,block=16 | q2:stochastic | zstd | budget:{n}"},
            "subset": {"uplink": f"subset:1.0,block=16 | q2:stochastic | zstd | budget:{n}"}}


def one(args: tuple[str, str, dict, int]) -> tuple[str, int, list[float]]:
    dataset, name, compression, seed = args
    import torch

    import fleetlearn

    torch.set_num_threads(1)
    cfg = {"seed": seed, "compression": compression, "monitoring": {"detectors": []}}
    if dataset == "fashion_mnist":
        cfg.update({"data": {"dataset": "fashion_mnist", "clients": 100, "partition": "dirichlet", "alpha": 0.5},
                    "client": {"local_epochs": 1, "batch_size": 32, "lr": 0.05}, "server": {"rounds": 30, "cohort": 20}})
    s = fleetlearn.run(cfg, store=False)
    return name, seed, [float(r.accuracy) for r in s.records]


def stats(d: np.ndarray) -> str:
    se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0
    return f"{d.mean():+.2f} sd {d.std(ddof=1) if d.size > 1 else 0:.2f} se {se:.2f}  seeds 0-2 {d[:3].mean():+.2f}  " + " ".join(f"{x:+.2f}" for x in d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=sorted(BUDGET))
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", help="also write every run's per-round accuracy here")
    args = ap.parse_args()
    table = chains(args.dataset)
    jobs = [(args.dataset, name, comp, seed) for name, comp in table.items() for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as ex:
        runs = list(ex.map(one, jobs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f)
    acc = {name: np.array([a for n, _, a in sorted(runs) if n == name]) for name in table}
    print(f"{args.dataset}, seeds 0-{args.seeds - 1}; accuracy differences in pp")
    for k in (1, 3, 5):
        last = {name: a[:, -k:].mean(1) for name, a in acc.items()}
        what = "final round" if k == 1 else f"mean of the last {k} rounds"
        for name in ("topk+ef", "subset"):
            print(f"{what:<26} {name:<8} vs float32: {stats(100 * (last[name] - last['float32']))}")
        print(f"{what:<26} subset - topk+ef (paired): {stats(100 * (last['subset'] - last['topk+ef']))}")
    for name, a in acc.items():
        print(f"{name:<8} mean |round-to-round change| over the last 5 rounds: {100 * np.abs(np.diff(a[:, -6:], axis=1)).mean():.2f} pp")


if __name__ == "__main__":
    main()
