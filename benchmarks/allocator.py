"""What a run's retained heap (`engine.running.RetainedHeap`) saves, phase by phase, on
vs_flower.py's workload (digits, IID, every client every round, 5 local epochs).

    PYTHONPATH=src .venv/bin/python benchmarks/allocator.py                  # N = 1000, 10 rounds, 3 pairs
    PYTHONPATH=src .venv/bin/python benchmarks/allocator.py --clients 100 --pairs 5

Each run is a fresh process (`mallopt` settings are process-wide, and glibc's adaptive
thresholds cannot be turned back on once set), one torch thread (`engine.threads =
"auto"`), the run store on, debug measurements on (the defaults). `default` runs with
`RetainedHeap` turned into a no-op (glibc's own adaptive thresholds), `retained` as
shipped. The two alternate `--pairs` times, so a drift of the machine's speed hits both.
Printed: per process, the median over rounds 2..R of the round and of its phases
(`Coordinator.phase_log`), then the median over processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("round", "train", "encode", "intake", "measure")


def one(mode: str, clients: int, rounds: int) -> dict:
    import logging

    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vs_flower import workload_config

    from fleetlearn.config import load_config
    from fleetlearn.data import load_federated
    from fleetlearn.engine import running
    from fleetlearn.engine.factory import build_coordinator

    if mode == "default":
        running.RetainedHeap.__enter__ = lambda self: self
        running.RetainedHeap.__exit__ = lambda self, *exc: None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(workload_config(clients, rounds, 0, tmp))
        data = load_federated(cfg.data, cfg.seed)
        coord = build_coordinator(cfg, data=data)
        summary = coord.run()
    phases = coord.phase_log[1:]
    out = {k: 1e3 * statistics.median(p[k] for p in phases) for k in PHASES if k != "round"}
    out["round"] = 1e3 * statistics.median(r.wall_seconds for r in summary.records[1:])
    out["accuracy"] = summary.final_accuracy
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--mode", choices=["default", "retained"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one(args.mode, args.clients, args.rounds)))
        return
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    got: dict[str, list[dict]] = {"default": [], "retained": []}
    for _ in range(args.pairs):
        for mode in got:
            res = subprocess.run([sys.executable, __file__, "--mode", mode, "--clients", str(args.clients), "--rounds", str(args.rounds)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"the {mode} run failed:\n{res.stderr[-3000:]}")
            got[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"N = {args.clients}, {args.rounds} rounds, medians of rounds 2..{args.rounds} (ms); per process, then [median]")
    for mode, runs in got.items():
        cells = []
        for k in PHASES:
            vals = [r[k] for r in runs]
            cells.append(f"{k} {' '.join(f'{v:.1f}' for v in vals)} [{statistics.median(vals):.1f}]")
        print(f"{mode:>9}: " + "; ".join(cells) + f"; accuracy {runs[0]['accuracy']:.4f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
