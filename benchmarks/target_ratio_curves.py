"""`[compression] target_ratio = 100`'s two chains against float32, round by round.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/target_ratio_curves.py default|fashion_mnist
        [--seeds 12] [--first-seed 0] [--jobs 2] [--chain NAME=SPEC ...] [--json FILE]

For each seed: float32 FedAvg and the two chains `compression.ratio.chain_for_ratio` builds
at ratio 100 for the job's model: ``topk+ef`` (error feedback and block top-k, what
target_ratio runs where the run cannot average by coverage) and ``subset`` (random blocks
averaged by coverage, what it runs otherwise); ``--chain NAME=SPEC`` adds a chain to
compare (e.g. ``subset-stochastic="subset:1.0,block=16 | q2:stochastic | zstd | budget:384"``).
``default`` is `fleetlearn run`'s default job (digits, 20 rounds, cohort 30 of 100);
``fashion_mnist`` the compression benchmark's (Dirichlet 0.5, 100 clients, cohort 20, 30
rounds, 1 local epoch, lr 0.05).  Prints, for the final round and for the mean of the last
3 and 5 rounds, each chain's difference to float32 (pp; mean, sd and standard error over
the seeds, the first three seeds, every seed) and the paired difference between each chain
and ``topk+ef``: the final round alone is one noisy snapshot.  Accuracy only, so the
machine's load does not matter.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np

DIM = {"default": 9_610, "fashion_mnist": 101_770}  # the two jobs' MLPs (64-128-10 and 784-128-10)
HEAD = {"default": 1_290, "fashion_mnist": 1_290}  # their output layers (128 x 10 + 10): compression.ratio.head_size


def chains(dataset: str, extra: list[str]) -> dict[str, dict]:
    from fleetlearn.compression.ratio import chain_for_ratio

    d = DIM[dataset]
    table = {"float32": {}, "topk+ef": {"uplink": chain_for_ratio(100, d, coverage=False)},
             "subset": {"uplink": chain_for_ratio(100, d, coverage=True, head=HEAD[dataset])}}
    for item in extra:
        name, sep, spec = item.partition("=")
        if not sep or not name or name in table:
            raise SystemExit(f"--chain takes NAME=SPEC with a new NAME, got {item!r}")
        table[name] = {"uplink": spec}
    return table


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
    return f"{d.mean():+.2f} sd {d.std(ddof=1) if d.size > 1 else 0:.2f} se {se:.2f}  first 3 {d[:3].mean():+.2f}  " + " ".join(f"{x:+.2f}" for x in d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=sorted(DIM))
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--chain", action="append", default=[], metavar="NAME=SPEC", help="another chain to compare")
    ap.add_argument("--json", help="also write every run's per-round accuracy here")
    args = ap.parse_args()
    table = chains(args.dataset, args.chain)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for name, comp in table.items():
        print(f"{name:<8} {comp.get('uplink', 'none')}")
    jobs = [(args.dataset, name, comp, seed) for name, comp in table.items() for seed in seeds]
    with ProcessPoolExecutor(args.jobs) as ex:
        runs = list(ex.map(one, jobs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f)
    acc = {name: np.array([a for n, _, a in sorted(runs) if n == name]) for name in table}
    print(f"{args.dataset}, seeds {seeds[0]}-{seeds[-1]}; accuracy differences in pp (\"first 3\": seeds {seeds[0]}-{seeds[0] + 2})")
    others = [n for n in table if n not in ("float32", "topk+ef")]
    for k in (1, 3, 5):
        last = {name: a[:, -k:].mean(1) for name, a in acc.items()}
        what = "final round" if k == 1 else f"mean of the last {k} rounds"
        for name in ["topk+ef", *others]:
            print(f"{what:<26} {name:<8} vs float32: {stats(100 * (last[name] - last['float32']))}")
        for name in others:
            print(f"{what:<26} {name} - topk+ef (paired): {stats(100 * (last[name] - last['topk+ef']))}")
    for name, a in acc.items():
        print(f"{name:<8} mean |round-to-round change| over the last 5 rounds: {100 * np.abs(np.diff(a[:, -6:], axis=1)).mean():.2f} pp")


if __name__ == "__main__":
    main()
