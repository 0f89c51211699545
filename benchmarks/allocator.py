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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _modes import measure_run, print_modes, run_modes  # noqa: E402


def one(mode: str, clients: int, rounds: int) -> dict:
    from fleetlearn.engine import running

    if mode == "default":
        running.RetainedHeap.__enter__ = lambda self: self
        running.RetainedHeap.__exit__ = lambda self, *exc: None
    return measure_run(clients, rounds)


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
    got = run_modes(__file__, ["default", "retained"], args.pairs, args.clients, args.rounds)
    print_modes(got, args.clients, args.rounds)


if __name__ == "__main__":
    main()
