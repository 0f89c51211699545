"""fleetlearn's round against the plain vmapped training loop doing the same local work.

    PYTHONPATH=src .venv/bin/python benchmarks/overhead.py                 # N = 100 and 1000
    PYTHONPATH=src .venv/bin/python benchmarks/overhead.py --clients 100 --rounds 6
    PYTHONPATH=src .venv/bin/python benchmarks/overhead.py --variants default --json out.json

Workload (issue 19; the vs_flower.py workload with its issue's local work): digits
(scikit-learn), IID, a 64-128-10 ReLU MLP, every client trains every round, 5 local
epochs, batch 32, plain SGD lr 0.3 (no momentum), FedAvg (server_lr 1).  N = 1000 uses
`data.examples_per_client = 2` (the digits pool has ~1400 training examples), as
vs_flower.py does.

(a) The plain loop: the same model, the same per-client data (fleetlearn's split), the
same mini-batches (fleetlearn's per-client seeds and batch schedule: `batch_indices`),
the same number of SGD steps, then the mean of the deltas weighted by example counts
(FedAvg's mean; a plain mean when the sizes are equal) added to the model.  One
`torch.func.vmap(grad(loss))` over the cohort per step, on parameters kept as a dict of
stacked tensors: what one would write by hand, with nothing else (no codec, no records,
no evaluation, no store).  Its round time includes drawing the batches.

(b) fleetlearn's round (`build_coordinator(cfg).run()`): the simulation transport, the
one client device, the wire codec, intake, the aggregation pipeline, the server
optimizer, central evaluation every round, the hooks and the commit.  Round time is
the interval between consecutive `on_round` calls (everything a round costs, the
commit included).  Variants: `default` (all settings as shipped: debug measurements
and the run store on), `no-debug` (`monitoring.debug = false`), `no-store` (the run in
memory, `fleetlearn.run(..., store=False)`), `lean` (both off).

Both sides run in this one process, with the same torch threads (fleetlearn's
`engine.threads = "auto"`: one thread for this model), alternately, the plain loop first.
Round 1 (first batched-gradient warm-up) is left out of every mean; the figure is the
median over the remaining rounds (a shared machine's hiccups hit the mean).  The phase
breakdown is fleetlearn's own phase timers (`RoundRecord.extra["phases"]`, plus the
commit, timed by the Coordinator after the record is written: `Coordinator.phase_log`).
Accuracy: both final models on the central test set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOCAL_EPOCHS, BATCH, LR, HIDDEN = 5, 32, 0.3, 128
VARIANTS = {
    "default": ({}, True),
    "no-debug": ({"monitoring": {"debug": False}}, True),
    "no-store": ({}, False),
    "lean": ({"monitoring": {"debug": False}}, False),
}
PHASES = ("train", "encode", "intake", "aggregate", "evaluate", "measure", "hooks", "commit")


def workload_config(n: int, rounds: int, seed: int, store_root: str | None = None) -> dict:
    data = {"dataset": "digits", "clients": n, "partition": "iid", "local_test_fraction": 0.0, "min_examples": 1}
    if n > 500:  # the digits pool has ~1400 training examples: ~2 per client at N = 1000
        data["examples_per_client"] = 2
    cfg = {
        "seed": seed,
        "data": data,
        "model": {"name": "mlp", "hidden": [HIDDEN]},
        "client": {"local_epochs": LOCAL_EPOCHS, "batch_size": BATCH, "lr": LR, "momentum": 0.0},
        "server": {"rounds": rounds, "cohort": n, "aggregator": "mean", "optimizer": "sgd", "server_lr": 1.0},
    }
    if store_root is not None:
        cfg["store"] = {"root": store_root}
    return cfg


def _old_batch_indices(sizes, hp, seeds):
    """fleetlearn's batches before `batch_indices` existed: a torch generator per client."""
    import numpy as np
    import torch

    from fleetlearn.learners.torch_learner import batch_schedule

    scheds = [batch_schedule(int(nc), hp, torch.Generator().manual_seed(int(s))) for nc, s in zip(sizes, seeds)]
    steps = max(len(x) for x in scheds)
    b = max(i.numel() for x in scheds for i in x)
    index = np.zeros((len(sizes), steps, b), dtype=np.int64)
    mask = np.zeros((len(sizes), steps, b), dtype=np.float32)
    for c, sched in enumerate(scheds):
        for s, idx in enumerate(sched):
            index[c, s, : idx.numel()] = idx.numpy()
            mask[c, s, : idx.numel()] = 1.0
    return torch.from_numpy(index), torch.from_numpy(mask)


# -- (a) the plain vmapped loop ------------------------------------------------------------
def plain_loop(cfg, data, rounds: int, group: int | None = None) -> dict:
    """The plain loop; `group`: clients per vmap call (None: the whole cohort in one)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    from fleetlearn.engine.factory import build_learner
    from fleetlearn.learners.base import FitConfig
    from fleetlearn.transport.simulation import client_seed

    try:
        from fleetlearn.learners.torch_learner import batch_indices
    except ImportError:  # fleetlearn before the batched batches (for a "before" measurement)
        batch_indices = _old_batch_indices

    learner = build_learner(cfg, data)  # the same module and initial model as fleetlearn's
    module = learner.make_module()
    names = list(learner.spec.names)
    init = learner.spec.split(learner.init_params(cfg.seed))
    params = {k: v.detach().clone() for k, v in init.items()}
    n = data.num_clients
    group = group or n
    sizes = data.train_sizes().astype(np.int64)
    order = torch.from_numpy(data.train_order)
    x_all, y_all = data.x[order], data.y[order]  # client c's rows: offsets[c]:offsets[c+1]
    offsets = torch.from_numpy(data.train_offsets[:-1])
    w = torch.from_numpy(sizes / sizes.sum()).to(torch.float32)
    hp = FitConfig(LOCAL_EPOCHS, None, BATCH, LR, 0.0)

    def loss(p, x, y, m):
        out = F.cross_entropy(functional_call(module, p, (x,)), y, reduction="none")
        return (out * m).sum() / m.sum().clamp(min=1.0)

    step = vmap(grad(loss))
    times, batch_times = [], []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        seeds = [client_seed(cfg.seed, r, c) for c in range(n)]
        index, mask = batch_indices(sizes, hp, seeds)[:2]  # (n, steps, b): fleetlearn's batches
        index = index + offsets[:, None, None]
        t1 = time.perf_counter()
        mean = {k: torch.zeros_like(v) for k, v in params.items()}
        for lo in range(0, n, group):
            hi = min(n, lo + group)
            p = {k: v.expand(hi - lo, *v.shape).clone() for k, v in params.items()}
            for s in range(index.shape[1]):
                rows = index[lo:hi, s]
                m = mask[lo:hi, s]
                g = step(p, x_all[rows], y_all[rows], m)
                act = (m.sum(1) > 0).to(torch.float32)
                for k in names:
                    p[k].addcmul_(act.view(-1, *([1] * (p[k].dim() - 1))), g[k], value=-LR)
            for k in names:
                mean[k] += torch.tensordot(w[lo:hi], p[k], dims=1)
        params = mean  # sum_c w_c (params + delta_c) = params + the weighted mean delta (sum w = 1)
        times.append(time.perf_counter() - t0)
        batch_times.append(t1 - t0)
    with torch.no_grad():
        logits = functional_call(module, params, (data.central_x,))
        acc = float((logits.argmax(-1) == data.central_y).float().mean())
    return {"round_s": times, "batches_s": batch_times, "accuracy": acc, "group": group}


# -- (b) fleetlearn ------------------------------------------------------------------------
def fleetlearn_rounds(n: int, rounds: int, seed: int, variant: str, data=None) -> dict:
    from fleetlearn.config import load_config
    from fleetlearn.engine.factory import build_coordinator

    overrides, store = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        raw = workload_config(n, rounds, seed, tmp)
        for section, values in overrides.items():
            raw.setdefault(section, {}).update(values)
        cfg = load_config(raw)
        coord = build_coordinator(cfg, store=store, data=data)
        stamps: list[float] = []
        t_start = time.perf_counter()
        summary = coord.run(on_round=lambda rec: stamps.append(time.perf_counter()))
    round_s = [b - a for a, b in zip([t_start] + stamps[:-1], stamps)]
    phases = [dict(p) for p in getattr(coord, "phase_log", [])]
    return {"round_s": round_s, "phases": phases, "accuracy": summary.final_accuracy, "train_s": [r.train_wall_seconds for r in summary.records]}


def steady(xs: list[float]) -> float:
    return statistics.median(xs[1:]) if len(xs) > 1 else xs[0]


def load_note() -> tuple[str, float]:
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return out, os.getloadavg()[0]


def one(n: int, rounds: int, seed: int, variants: list[str]) -> dict:
    import torch

    from fleetlearn.config import load_config
    from fleetlearn.data import load_federated
    from fleetlearn.engine.running import run_threads

    cfg = load_config(workload_config(n, rounds, seed))
    data = load_federated(cfg.data, cfg.seed)
    from fleetlearn.engine.factory import build_learner

    threads = run_threads(cfg.engine.threads, build_learner(cfg, data).spec.dim)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        # The plain loop twice: one vmap over the whole cohort, and in the groups fleetlearn's
        # learner trains in (`TorchLearner.group_size`); the faster one is the baseline.
        group = getattr(build_learner(cfg, data), "group_size", lambda: n)()
        plains = [plain_loop(cfg, data, rounds)] + ([plain_loop(cfg, data, rounds, group)] if group < n else [])
    finally:
        torch.set_num_threads(before)
    plain = min(plains, key=lambda p: steady(p["round_s"]))
    plain["others"] = [{"group": p["group"], "ms": 1000 * steady(p["round_s"])} for p in plains if p is not plain]
    out = {"clients": n, "rounds": rounds, "threads": threads or before, "plain": plain, "fleetlearn": {}}
    for v in variants:
        out["fleetlearn"][v] = fleetlearn_rounds(n, rounds, seed, v, data)
    return out


def phase_table(phases: list[dict]) -> dict[str, float]:
    """Median ms per phase over the rounds after the first."""
    rows = phases[1:] if len(phases) > 1 else phases
    keys = [k for k in PHASES if any(k in p for p in rows)] + sorted({k for p in rows for k in p} - set(PHASES))
    return {k: 1000 * statistics.median([p.get(k, 0.0) for p in rows]) for k in keys}


def report(res: dict) -> None:
    n, plain = res["clients"], res["plain"]
    p_ms = 1000 * steady(plain["round_s"])
    print(f"\nN = {n} clients, {res['rounds']} rounds (round 1 left out), torch threads {res['threads']}")
    print(f"  plain vmapped loop: {p_ms:8.1f} ms/round ({plain['group']} clients per vmap; drawing the batches "
          f"{1000 * steady(plain['batches_s']):.1f} ms); final accuracy {plain['accuracy']:.4f}")
    for o in plain.get("others", []):
        print(f"    (plain loop with {o['group']} clients per vmap: {o['ms']:.1f} ms/round)")
    print(f"  {'variant':10s} {'ms/round':>9s} {'ratio':>6s} {'accuracy':>9s}")
    for v, f in res["fleetlearn"].items():
        f_ms = 1000 * steady(f["round_s"])
        print(f"  {v:10s} {f_ms:9.1f} {f_ms / p_ms:6.2f} {f['accuracy']:9.4f}")
    for v, f in res["fleetlearn"].items():
        if f["phases"]:
            parts = "  ".join(f"{k} {ms:.1f}" for k, ms in phase_table(f["phases"]).items())
            print(f"  phases ({v}, ms): {parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    args = ap.parse_args()
    up, load = load_note()
    print(f"before: {up}")
    if load > 0.5:
        print(f"WARNING: 1-min load average {load:.2f} > 0.5: the machine is busy; these timings do not count")
    results = [one(n, args.rounds, args.seed, args.variants) for n in args.clients]
    for res in results:
        report(res)
    up2, load2 = load_note()
    print(f"\nafter: {up2}")
    if max(load, load2) > 0.5:
        print(f"WARNING: 1-min load average {max(load, load2):.2f} > 0.5: the machine is busy; these timings do not count")
    if args.json is not None:
        args.json.write_text(json.dumps({"load_before": load, "load_after": load2, "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
