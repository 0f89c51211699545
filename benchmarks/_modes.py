"""Shared by allocator.py and round_parts.py: vs_flower.py's workload run in fresh
processes, one per mode, the modes taking turns, and the medians of each run's rounds and
phases."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("round", "train", "encode", "intake", "measure")


def measure_run(clients: int, rounds: int) -> dict:
    """One run of vs_flower.py's workload with default settings (run store and debug
    measurements on): the median over rounds 2..R of the round and of its phases
    (`Coordinator.phase_log`, ms), and the final accuracy."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vs_flower import workload_config

    from fleetlearn.config import load_config
    from fleetlearn.data import load_federated
    from fleetlearn.engine.factory import build_coordinator

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


def run_modes(script: str, modes, pairs: int, clients: int, rounds: int) -> dict[str, list[dict]]:
    """`script --mode M --clients N --rounds R` for each mode in turn, `pairs` times, each a
    fresh process that prints `measure_run`'s dict as its last line of JSON."""
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    got: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(pairs):
        for mode in got:
            res = subprocess.run([sys.executable, script, "--mode", mode, "--clients", str(clients), "--rounds", str(rounds)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"the {mode} run failed:\n{res.stderr[-3000:]}")
            got[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    return got


def print_modes(got: dict[str, list[dict]], clients: int, rounds: int) -> None:
    """Per mode: each process's medians, then [their median]; the accuracy of its first run."""
    print(f"N = {clients}, {rounds} rounds, medians of rounds 2..{rounds} (ms); per process, then [median]")
    width = max(len(m) for m in got)
    for mode, runs in got.items():
        cells = []
        for k in PHASES:
            vals = [r[k] for r in runs]
            cells.append(f"{k} {' '.join(f'{v:.1f}' for v in vals)} [{statistics.median(vals):.1f}]")
        print(f"{mode:>{width}}: " + "; ".join(cells) + f"; accuracy {runs[0]['accuracy']:.4f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
