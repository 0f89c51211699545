"""Personalization: personal vs global accuracy on the clients' local test splits.

    .venv/bin/python benchmarks/personalization.py [--rounds 5 10 20] [--seeds 3] [--dataset digits|sotu] [--local-epochs N]

Digits, 100 clients, Dirichlet(0.1) label skew, the default job (64-128-10 MLP, 10 local
epochs, batch 8, lr 0.05, momentum 0.9, cohort 30), `[personalization]` defaults:
finetune 5 steps at client.lr; FedPer head = the last layer; Ditto lambda = 0.1 with
client.local_epochs personal epochs per round.  After the last round every client with a
local test split (~82 of 100) is evaluated: its personal model and the global model on
its local test split.

`--dataset sotu`: the natural split instead, next-character prediction with one client per
president (43), the setting of benchmarks/sotu.py (char_gru 32 units, 10 clients per round,
20 local steps); FedPer's head is the GRU's output layer.

Columns: `global` = the run's own global model (for FedPer: the shared body with the
server's never-trained head, so not a useful model by itself); `FedAvg` = the global
model of plain FedAvg with the same seed (finetune and Ditto train the very same global
model); `gain` = personal - FedAvg (the question a user asks: is my personal model better
than what plain FedAvg would give me?).  Means over seeds (+- std across seeds).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fleetlearn

METHODS = ("none", "finetune", "fedper", "ditto")


BASES = {
    "digits": {"data": {"dataset": "digits", "clients": 100, "partition": "dirichlet", "alpha": 0.1}, "server": {}},
    "sotu": {
        "data": {"dataset": "sotu", "text_seq_len": 20, "text_stride": 2, "text_max_chars": 2000},
        "model": {"name": "char_gru", "hidden": [32]},
        "client": {"local_steps": 20, "batch_size": 32, "lr": 0.5, "momentum": 0.9},
        "server": {"cohort": 10},
    },
}


def one(method: str, rounds: int, seed: int, dataset: str = "digits", local_epochs: int | None = None) -> dict:
    base = BASES[dataset]
    cfg = {
        **base,
        "client": {**base.get("client", {}), **({"local_epochs": local_epochs} if local_epochs else {})},
        "seed": seed,
        "server": {**base["server"], "rounds": rounds},
        "personalization": {"method": method},
        "monitoring": {"debug": False},
    }
    t = time.perf_counter()
    s = fleetlearn.run(cfg, store=False)
    last = s.records[-1]
    p = last.extra.get("personalization", {})
    return {
        "central": s.final_accuracy,
        "global": p.get("global_accuracy", last.fed_accuracy),
        "personal": p.get("personal_accuracy", float("nan")),
        "improved": p.get("clients_improved", float("nan")),
        "clients": p.get("clients", 0),
        "wall": time.perf_counter() - t,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dataset", choices=sorted(BASES), default="digits")
    ap.add_argument("--local-epochs", type=int, default=None, help="override client.local_epochs (default: the job's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| rounds | method | central acc (global) | global on local tests | FedAvg on local tests | personal | gain vs FedAvg | clients improved (vs own global) | s/run |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for rounds in args.rounds:
        runs = {m: [one(m, rounds, seed, args.dataset, args.local_epochs) for seed in range(args.seeds)] for m in METHODS}
        fedavg = np.array([r["global"] for r in runs["none"]])
        for m in METHODS:
            rs = runs[m]
            col = lambda k: np.array([r[k] for r in rs])  # noqa: E731
            personal = col("personal")
            gain = personal - fedavg
            fmt = lambda a: f"{np.mean(a):.3f} +- {np.std(a):.3f}" if not np.isnan(a).all() else "-"  # noqa: E731
            print(
                f"| {rounds} | {m} | {np.mean(col('central')):.3f} | {np.mean(col('global')):.3f} | {np.mean(fedavg):.3f} | "
                f"{fmt(personal)} | {fmt(gain) if m != 'none' else '-'} | "
                f"{np.mean(col('improved')) if m != 'none' else float('nan'):.2f} | {np.mean(col('wall')):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
