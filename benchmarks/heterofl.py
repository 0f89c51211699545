"""HeteroFL and distillation on a fleet of devices with different memory.

    .venv/bin/python benchmarks/heterofl.py [--rounds 20] [--seeds 2]

Digits, 100 clients, Dirichlet(0.5), cohort 30, the default client settings (10 local
epochs); `mixed_fleet` devices whose training memory is log-normal around 512 MB
(sigma 1), the full 64-128-10 model needing 512 MB (`model.full_width_memory_mb`).  Rows:

- all full width: every device trains the full model (what a fleet with enough memory does);
- HeteroFL 1 / 0.5 / 0.25: each device the largest width its memory holds (about half
  full width, a quarter each at 0.5 and 0.25);
- all at 0.25: every device trains the 0.25-width sub-model (sized for the weakest);
- HeteroFL + FedDF: the same, with FedDF's server step (100 Adam steps per round on the
  unlabeled half of the held-out set);
- HeteroFL + student: the HeteroFL global model distilled into a 64-16-10 on-device student
  every 5 rounds (the weakest devices' alternative to the 0.25-width sub-model).

"acc full @5": the full-width model after 5 rounds (FedDF's gains are early, while the
client models are still far apart).  Every row is evaluated on the same test set: the half of the held-out central set that is
*not* FedDF's unlabeled data.  Accuracy at width w = the global model sliced to width w;
"own width" = each client's local test split at its own width (federated evaluation).
Bytes are the real encoded sizes of what each client downloaded and uploaded.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.learners.distill import split_unlabeled

BASE = {
    "data": {"dataset": "digits", "clients": 100, "partition": "dirichlet", "alpha": 0.5},
    "devices": {"profile": "mixed_fleet"},
}
EARLY = 5  # also report the full-width model after this many rounds
HET = {"widths": [1.0, 0.5, 0.25], "width_rule": "memory", "full_width_memory_mb": 512.0}


def variants() -> dict[str, dict]:
    return {
        "all full width": {"model": {"widths": [1.0]}},
        "HeteroFL 1 / 0.5 / 0.25 by memory": {"model": HET},
        "all at 0.25": {"model": {"widths": [1.0, 0.25], "width_rule": "memory", "full_width_memory_mb": 1e9}},
        "HeteroFL + FedDF": {"model": HET, "distill": {"method": "feddf"}},
        "HeteroFL + student 64-16-10": {"model": HET, "distill": {"student_hidden": [16], "student_every": 5}},
    }


def run_one(over: dict, rounds: int, seed: int) -> dict:
    cfg = load_config({**BASE, **over, "server": {"rounds": rounds}, "seed": seed})
    c = build_coordinator(cfg, store=False)
    early: dict = {}
    s = c.run(on_round=lambda rec: early.setdefault("params", c.params) if rec.round == EARLY else None)
    # The common test set: the central set less FedDF's unlabeled half (same split as the engine's).
    from fleetlearn.data import load_federated

    data = load_federated(cfg.data, seed)
    _, tx, ty = split_unlabeled(data.central_x, data.central_y, 0.5, seed)
    learner = c.learner
    plan = getattr(learner, "plan", None)
    widths = plan.widths if plan is not None else (1.0,)
    share = {w: float(np.mean(learner.client_widths == w)) for w in widths} if plan is not None else {1.0: 1.0}
    acc = {w: (plan.accuracy(c.params, w, tx, ty) if plan is not None else float(learner.per_example(c.params, tx, ty)[1].mean())) for w in widths}
    acc_early = float(learner.per_example(early["params"], tx, ty)[1].mean())  # the full-width model
    last = s.records[-1]
    return {
        "share": share,
        "acc_full": acc[1.0] if share.get(1.0, 0) > 0 else float("nan"),
        "acc_early": acc_early if share.get(1.0, 0) > 0 else float("nan"),
        "acc_smallest": acc[min(w for w in widths if share[w] > 0)],
        "fed_own": last.fed_accuracy,
        "student": last.extra.get("student_accuracy", float("nan")),
        "up_mb": s.uplink_bytes / 1e6,
        "down_mb": s.downlink_bytes / 1e6,
        "sim_s": s.sim_seconds,
    }


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    print(f"{args.rounds} rounds, mean over seeds 0..{args.seeds - 1}")
    print(f"{'variant':<36} {'clients at 1/.5/.25':>20} {'acc full @' + str(EARLY):>12} {'acc full':>9} {'acc smallest':>13} {'fed own width':>14} {'student':>8} {'up MB':>7} {'down MB':>8} {'sim s':>7}")
    for name, over in variants().items():
        rows = [run_one(over, args.rounds, seed) for seed in range(args.seeds)]
        m = lambda k: float(np.mean([r[k] for r in rows]))
        share = "/".join(f"{np.mean([r['share'].get(w, 0.0) for r in rows]):.2f}" for w in (1.0, 0.5, 0.25))
        print(f"{name:<36} {share:>20} {m('acc_early'):>12.4f} {m('acc_full'):>9.4f} {m('acc_smallest'):>13.4f} {m('fed_own'):>14.4f} {m('student'):>8.4f} {m('up_mb'):>7.2f} {m('down_mb'):>8.2f} {m('sim_s'):>7.1f}", flush=True)


if __name__ == "__main__":
    main()
