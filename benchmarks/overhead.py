"""fleetlearn's round against the plain vmapped training loop doing the same local work.

    PYTHONPATH=src .venv/bin/python benchmarks/overhead.py                 # N = 100 and 1000
    PYTHONPATH=src .venv/bin/python benchmarks/overhead.py --clients 100 --rounds 6
    PYTHONPATH=src .venv/bin/python benchmarks/overhead.py --variants default --json out.json
    PYTHONPATH=src python3 benchmarks/overhead.py --device cuda      # both sides on the GPU

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
memory, `fleetlearn.run(..., store=False)`), `lean` (both off), `compiled` (the defaults
with `[engine] training_kernels = "compiled"`; not run unless asked: `--variants`).

Both sides run in this one process, with the same torch threads (fleetlearn's
`engine.threads = "auto"`: one thread for this model), alternately, the plain loop first.
Round 1 (first batched-gradient warm-up) is left out of every mean; the figure is the
median over the remaining rounds (a shared machine's hiccups hit the mean).  The phase
breakdown is fleetlearn's own phase timers (`RoundRecord.extra["phases"]`, plus the
commit, timed by the Coordinator after the record is written: `Coordinator.phase_log`).
Accuracy: both final models on the central test set.

``--device cuda`` (or ``auto``) puts both sides on the GPU: the plain loop's parameters,
data and steps, and fleetlearn's `engine.device` (clients train and the model is
evaluated there; fleetlearn's global vector, codec and aggregation stay on the CPU).  The
plain loop's round ends with a `torch.cuda.synchronize()`.
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

# The workload is vs_flower.py's (the script's folder is on sys.path when it runs).
from vs_flower import BATCH, LOCAL_EPOCHS, LR, workload_config  # noqa: E402
VARIANTS = {
    "default": ({}, True),
    "no-debug": ({"monitoring": {"debug": False}}, True),
    "no-store": ({}, False),
    "lean": ({"monitoring": {"debug": False}}, False),
    # `[engine] training_kernels = "compiled"`: the batched step compiled (round 1, which is
    # left out of the medians, pays for the compiler)
    "compiled": ({"engine": {"training_kernels": "compiled"}}, True),
}
PHASES = ("select", "train", "encode", "intake", "aggregate", "evaluate", "measure", "hooks", "commit", "commit wait", "other")


def _fallback_seeds(seed, r, clients):
    """`fleetlearn.transport.client_seeds` for a fleetlearn that predates it (a "before"
    measurement): the plain loop's own cost stays the same in both measurements."""
    import numpy as np

    def mix(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    g = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        head = mix(mix(np.array([seed], dtype=np.uint64) + g) ^ (np.array([r], dtype=np.uint64) + g))
        return (mix(head ^ (np.asarray(list(clients), dtype=np.uint64) + g)) >> np.uint64(1)).astype(np.int64).tolist()


def _fallback_batches(sizes, hp, seeds):
    """`fleetlearn.learners.torch_learner.batch_indices` for a fleetlearn that predates it:
    one random permutation per client and epoch, drawn for the whole cohort at once.  (On
    this workload every client's data fits one batch of 32, so each epoch is one full-batch
    step and the order of the rows does not change the model.)"""
    import numpy as np
    import torch

    sizes = np.asarray(sizes, dtype=np.int64)
    n, width, bs = len(sizes), int(sizes.max()), int(hp.batch_size)
    rng = np.random.default_rng(int(seeds[0]) if len(seeds) else 0)
    per_epoch = np.maximum(1, -(-sizes // bs))
    steps, b = int(hp.local_epochs * per_epoch.max()), min(bs, width)
    keys = rng.random((n, hp.local_epochs, width))
    keys[np.broadcast_to(np.arange(width)[None, None, :] >= sizes[:, None, None], keys.shape)] = 2.0
    perms = np.argsort(keys, axis=2)
    s = np.arange(steps)[None, :]
    ep, j = s // per_epoch[:, None], s % per_epoch[:, None]
    live = ep < hp.local_epochs
    pos = j[:, :, None] * bs + np.arange(b)[None, None, :]
    valid = live[:, :, None] & (pos < sizes[:, None, None])
    idx = perms[np.arange(n)[:, None, None], np.minimum(ep, hp.local_epochs - 1)[:, :, None], np.minimum(pos, width - 1)]
    return torch.from_numpy(np.where(valid, idx, 0)), torch.from_numpy(valid.astype(np.float32))


# -- (a) the plain vmapped loop ------------------------------------------------------------
class PlainLoop:
    """The plain loop, one round per `round(r)` call; `group`: clients per vmap call (None:
    the whole cohort in one)."""

    def __init__(self, cfg, data, group: int | None = None):
        import numpy as np
        import torch
        import torch.nn.functional as F
        from torch.func import functional_call, grad, vmap

        from fleetlearn.engine.factory import build_learner
        from fleetlearn.learners.base import FitConfig

        try:
            from fleetlearn.transport.simulation import client_seeds
        except ImportError:  # fleetlearn before the per-cohort seeds (a "before" measurement)
            client_seeds = _fallback_seeds
        try:
            from fleetlearn.learners.torch_learner import batch_indices
        except ImportError:  # fleetlearn before the batched batches (a "before" measurement)
            batch_indices = _fallback_batches

        self.cfg, self.data = cfg, data
        self.device = dev = torch.device(_device_of(cfg))
        learner = build_learner(cfg, data)  # the same module and initial model as fleetlearn's
        self.module = module = learner.make_module()
        self.names = list(learner.spec.names)
        self.params = {k: v.detach().clone().to(dev) for k, v in learner.spec.split(learner.init_params(cfg.seed)).items()}
        self.n = data.num_clients
        self.group = group or self.n
        self.sizes = data.train_sizes().astype(np.int64)
        order = torch.from_numpy(data.train_order)
        self.x_all, self.y_all = data.x[order].to(dev), data.y[order].to(dev)  # client c's rows: offsets[c]:offsets[c+1]
        self.offsets = torch.from_numpy(data.train_offsets[:-1])
        self.w = torch.from_numpy(self.sizes / self.sizes.sum()).to(torch.float32).to(dev)
        self.hp = FitConfig(LOCAL_EPOCHS, None, BATCH, LR, 0.0)
        self.client_seeds, self.batch_indices = client_seeds, batch_indices

        def loss(p, x, y, m):
            out = F.cross_entropy(functional_call(module, p, (x,)), y, reduction="none")
            return (out * m).sum() / m.sum().clamp(min=1.0)

        self.step = vmap(grad(loss))
        self.round_s: list[float] = []
        self.batches_s: list[float] = []

    def round(self, r: int) -> None:
        import torch

        t0 = time.perf_counter()
        n, group, names = self.n, self.group, self.names
        seeds = self.client_seeds(self.cfg.seed, r, range(n))
        index, mask = self.batch_indices(self.sizes, self.hp, seeds)[:2]  # (n, steps, b): fleetlearn's batches
        index = (index + self.offsets[:, None, None]).to(self.device)
        mask = mask.to(self.device)
        t1 = time.perf_counter()
        mean = {k: torch.zeros_like(v) for k, v in self.params.items()}
        for lo in range(0, n, group):
            hi = min(n, lo + group)
            p = {k: v.expand(hi - lo, *v.shape).clone() for k, v in self.params.items()}
            for s in range(index.shape[1]):
                rows = index[lo:hi, s]
                m = mask[lo:hi, s]
                g = self.step(p, self.x_all[rows], self.y_all[rows], m)
                act = (m.sum(1) > 0).to(torch.float32)
                for k in names:
                    p[k].addcmul_(act.view(-1, *([1] * (p[k].dim() - 1))), g[k], value=-LR)
            for k in names:
                mean[k] += torch.tensordot(self.w[lo:hi], p[k], dims=1)
        self.params = mean  # sum_c w_c (params + delta_c) = params + the weighted mean delta (sum w = 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.round_s.append(time.perf_counter() - t0)
        self.batches_s.append(t1 - t0)

    def accuracy(self) -> float:
        import torch
        from torch.func import functional_call

        with torch.no_grad():
            logits = functional_call(self.module, self.params, (self.data.central_x.to(self.device),))
            return float((logits.argmax(-1).cpu() == self.data.central_y).float().mean())


def _device_of(cfg) -> str:
    """The config's `engine.device`, resolved ("auto": CUDA when present)."""
    device = getattr(cfg.engine, "device", "cpu")
    try:
        from fleetlearn.learners import resolve_device
    except ImportError:  # fleetlearn before engine.device for built-in models: the CPU
        return "cpu"
    return str(resolve_device(device))


def with_device(raw: dict, device: str) -> dict:
    if device != "cpu":
        raw.setdefault("engine", {})["device"] = device
    return raw


def plain_group(cfg, data, rounds: int = 4) -> int | None:
    """Whichever of one vmap over the cohort or fleetlearn's groups (`TorchLearner.group_size`)
    runs the plain loop faster here (None: one vmap)."""
    from fleetlearn.engine.factory import build_learner

    n = data.num_clients
    group = getattr(build_learner(cfg, data), "group_size", lambda: n)()
    if group >= n:
        return None
    times = {}
    for g in (None, group, None, group):
        loop = PlainLoop(cfg, data, g)
        for r in range(1, rounds + 1):
            loop.round(r)
        times.setdefault(g, []).append(steady(loop.round_s))
    return min(times, key=lambda g: min(times[g]))


# -- (b) fleetlearn, round by round with the plain loop ------------------------------------
def paired_rounds(n: int, rounds: int, seed: int, variant: str, data, group: int | None, device: str = "cpu") -> dict:
    """fleetlearn's run with one plain round after each of its rounds (inside `on_round`),
    so both see the same moments of a shared machine.  fleetlearn's round r is the time from
    the end of plain round r - 1 to `on_round`, plus the wait for its background commit to
    finish (the plain round never runs beside fleetlearn's writer: conservative for fleetlearn)."""
    from fleetlearn.config import load_config
    from fleetlearn.engine.factory import build_coordinator

    overrides, store = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        raw = with_device(workload_config(n, rounds, seed, tmp), device)
        for section, values in overrides.items():
            raw.setdefault(section, {}).update(values)
        cfg = load_config(raw)
        coord = build_coordinator(cfg, store=store, data=data)
        plain = PlainLoop(cfg, data, group)
        fl: list[float] = []
        waits: list[float] = []
        mark = [0.0]

        def on_round(rec) -> None:
            t_a = time.perf_counter()
            writer = getattr(coord.store, "writer", None) if coord.store is not None else None
            if writer is not None:
                writer.wait()
            t_b = time.perf_counter()
            fl.append(t_b - mark[0])
            waits.append(t_b - t_a)
            plain.round(rec.round)
            mark[0] = time.perf_counter()

        mark[0] = time.perf_counter()
        summary = coord.run(on_round=on_round)  # the plain rounds run inside it: under the run's torch threads
    phases = [dict(p) for p in getattr(coord, "phase_log", [])]
    for ph, w, total in zip(phases, waits, fl):
        if store:
            ph["commit wait"] = w  # the background commit's rest, waited for before the plain round
        ph["other"] = total - sum(ph.values())  # the driver, the selector's observe, GC, ...
    return {
        "round_s": fl, "plain_s": plain.round_s, "batches_s": plain.batches_s, "phases": phases,
        "accuracy": summary.final_accuracy, "plain_accuracy": plain.accuracy(), "group": plain.group,
    }


def steady(xs: list[float]) -> float:
    return statistics.median(xs[1:]) if len(xs) > 1 else xs[0]


def load_note() -> tuple[str, float]:
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return out, os.getloadavg()[0]


def one(n: int, rounds: int, seed: int, variants: list[str], device: str = "cpu") -> dict:
    import torch

    from fleetlearn.config import load_config
    from fleetlearn.data import load_federated
    from fleetlearn.engine.factory import build_learner
    from fleetlearn.engine.running import run_threads

    cfg = load_config(with_device(workload_config(n, rounds, seed), device))
    data = load_federated(cfg.data, cfg.seed)
    threads = run_threads(cfg.engine.threads, build_learner(cfg, data).spec.dim)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        group = plain_group(cfg, data)
    finally:
        torch.set_num_threads(before)
    out = {"clients": n, "rounds": rounds, "threads": threads or before, "device": _device_of(cfg), "fleetlearn": {}}
    for v in variants:
        out["fleetlearn"][v] = paired_rounds(n, rounds, seed, v, data, group, device)
    return out


def phase_table(phases: list[dict]) -> dict[str, float]:
    """Median ms per phase over the rounds after the first."""
    rows = phases[1:] if len(phases) > 1 else phases
    keys = [k for k in PHASES if any(k in p for p in rows)] + sorted({k for p in rows for k in p} - set(PHASES))
    return {k: 1000 * statistics.median([p.get(k, 0.0) for p in rows]) for k in keys}


def report(res: dict) -> None:
    n = res["clients"]
    print(f"\nN = {n} clients, {res['rounds']} rounds (round 1 left out; medians), torch threads {res['threads']}, "
          f"device {res.get('device', 'cpu')}")
    print(f"  {'variant':10s} {'fleetlearn ms':>13s} {'plain ms':>9s} {'ratio':>6s} {'overlapped':>10s} {'acc fleetlearn':>14s} {'acc plain':>9s}")
    for v, f in res["fleetlearn"].items():
        f_ms, p_ms = 1000 * steady(f["round_s"]), 1000 * steady(f["plain_s"])
        waits = [p.get("commit wait", 0.0) for p in f["phases"]] or [0.0] * len(f["round_s"])
        o_ms = 1000 * steady([t - w for t, w in zip(f["round_s"], waits)])
        print(f"  {v:10s} {f_ms:13.1f} {p_ms:9.1f} {f_ms / p_ms:6.2f} {o_ms / p_ms:10.2f} {f['accuracy']:14.4f} {f['plain_accuracy']:9.4f}")
    print("  (ratio: the background commit waited for before the plain round, all of it counted; overlapped: without that"
          " wait, as when the commit runs beside the next round)")
    first = next(iter(res["fleetlearn"].values()))
    print(f"  (plain loop: {first['group'] or n} clients per vmap; drawing the batches {1000 * steady(first['batches_s']):.1f} ms of its round)")
    for v, f in res["fleetlearn"].items():
        if f["phases"]:
            parts = "  ".join(f"{k} {ms:.1f}" for k, ms in phase_table(f["phases"]).items())
            print(f"  phases ({v}, ms): {parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "compiled"], choices=list(VARIANTS))
    ap.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto: where both sides train (fleetlearn's engine.device)")
    args = ap.parse_args()
    up, load = load_note()
    print(f"before: {up}")
    if load > 0.5:
        print(f"WARNING: 1-min load average {load:.2f} > 0.5: the machine is busy; these timings do not count")
    results = [one(n, args.rounds, args.seed, args.variants, args.device) for n in args.clients]
    for res in results:
        report(res)
    up2, load2 = load_note()
    print(f"\nafter: {up2}  (this benchmark itself adds about 1 to the load average)")
    if load > 0.5 or load2 > 1.5:
        print(f"WARNING: 1-min load average {load:.2f} before / {load2:.2f} after (above 0.5 before, or 1.5 after "
              "counting this process): the machine is busy; these timings do not count")
    if args.json is not None:
        args.json.write_text(json.dumps({"load_before": load, "load_after": load2, "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
