"""Where global top-k spends its budget, layer by layer, on real client deltas.

    .venv/bin/python benchmarks/topk_layers.py [--fraction 0.01] [--rounds 3] [--clients 3]

Fashion-MNIST when its files are installed, else digits; 100 clients, Dirichlet(0.5),
the compression benchmark's client settings.  For `--rounds` rounds of FedAvg (cohort 5),
`--clients` clients each train from the current global model and the script prints,
per layer, the share of the delta's top-`fraction` entries (by magnitude) that fall in
it next to the layer's share of the parameters.  A diagnostic for the >= 100x
compression target: it shows whether a flat top-k starves the large layers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fashion = Path("/usr/share/datasets/fashion-mnist").is_dir()
    client = {"local_epochs": 1, "batch_size": 32, "lr": 0.05} if fashion else {}
    cfg = load_config({"data": {"dataset": "fashion_mnist" if fashion else "digits", "clients": 100, "partition": "dirichlet", "alpha": 0.5},
                       "client": client, "server": {"rounds": args.rounds, "cohort": 5}, "monitoring": {"detectors": []}})
    coord = build_coordinator(cfg, store=False)
    spec = coord.learner.spec
    sizes = np.array([int(np.prod(s)) for s in spec.shapes])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    print(f"dataset {cfg.data.dataset}, top {args.fraction:g} of {sizes.sum():,} parameters")
    print(f"{'round':>5} {'client':>6}  " + "  ".join(f"{n} ({z / sizes.sum():.3f})" for n, z in zip(spec.names, sizes)))
    shares = []
    for r in range(1, args.rounds + 1):
        hp = coord.fit_config()
        for cid in range(args.clients):
            delta = coord.learner.fit(coord.params, coord.transport.client_data(cid), hp, seed=cid).delta
            idx = torch.topk(delta.abs(), max(1, int(args.fraction * delta.numel()))).indices.numpy()
            share = np.histogram(idx, bins=bounds)[0] / idx.size
            shares.append(share)
            print(f"{r:>5} {cid:>6}  " + "  ".join(f"{s:>{len(n) + 8}.2f}" for n, s in zip(spec.names, share)))
        coord.run_round()
    lo, hi = np.min(shares, axis=0), np.max(shares, axis=0)
    print("range " + "  ".join(f"{n}: {a:.2f}-{b:.2f}" for n, a, b in zip(spec.names, lo, hi)))


if __name__ == "__main__":
    main()
