"""What each part of a 1,000-client round's own work costs: the shipped round against the
same round with one part put back as it was before issue 19's stop 33 (vs_flower.py's
workload: digits, IID, every client every round, 5 local epochs, one torch thread).

    PYTHONPATH=src .venv/bin/python benchmarks/round_parts.py                 # N = 1000, 12 rounds, 3 rounds of modes
    PYTHONPATH=src .venv/bin/python benchmarks/round_parts.py --modes shipped groups --pairs 5

Modes (each one part undone in the shipped code, by patching it in that process only):

- `shipped`: as is;
- `groups`: eager training in groups of at most 8 MiB of parameters (218 clients of the
  digits MLP; `TorchLearner.group_size` before `TENSOR_BYTES`);
- `direct-measure`: the debug measurements take every distance on the differences (the
  path `_spread` keeps for rows that would cancel);
- `cohort-list`: the simulation hands the device a list of per-client views (every
  client's `ClientData` made, then joined again by the learner), not a `CohortData`;
- `json`: the store writes its JSON columns with the json module, not orjson;
- `all-old`: every one of the above at once.

Each run is a fresh process; the modes take turns `--pairs` times, so a drift of the
machine's speed hits each alike.  Printed: per process, the median over rounds 2..R of the
round and of its phases (`Coordinator.phase_log`), then the median over processes, and the
final accuracy (the same in every mode: none of these parts changes a result).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _modes import measure_run, print_modes, run_modes  # noqa: E402
MODES = ("shipped", "groups", "direct-measure", "cohort-list", "json", "all-old")


def undo(mode: str) -> None:
    """Put the parts `mode` names back as they were (in this process)."""
    import math

    parts = {"groups", "direct-measure", "cohort-list", "json"} if mode == "all-old" else {mode}
    if "groups" in parts:
        import fleetlearn.learners.torch_learner as tl

        tl.GROUP_BYTES, tl.TENSOR_BYTES = 8 << 20, 1 << 62
    if "direct-measure" in parts:
        import fleetlearn.monitoring.measurements as m

        m._CANCEL = math.inf
    if "cohort-list" in parts:
        from fleetlearn.transport.simulation import SimulationTransport

        shipped = SimulationTransport.cohort_data
        SimulationTransport.cohort_data = lambda self, clients: list(shipped(self, clients))
    if "json" in parts:
        import fleetlearn.ops.store as store

        store._json_dumps = json.dumps


def one(mode: str, clients: int, rounds: int) -> dict:
    undo(mode)
    return measure_run(clients, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--pairs", type=int, default=3, help="times each mode runs (the modes take turns)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one(args.mode, args.clients, args.rounds)))
        return
    got = run_modes(__file__, args.modes, args.pairs, args.clients, args.rounds)
    print_modes(got, args.clients, args.rounds)


if __name__ == "__main__":
    main()
