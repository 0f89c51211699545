"""Wall time per phase of a round: cheap timers the engine leaves on.

A round's phases (seconds of `time.perf_counter`, summed when a phase runs more than once):

- ``select``: schedules, the pool, selection, the task (its encoded model);
- ``train``: local training (the transport's `train_wall_seconds`: simulation and Ray);
- ``encode``: the clients' uplink encoding (the transport's `encode_wall_seconds`);
- ``intake``: the rest of collecting the replies: decode, validate, the clients' records,
  the relative-norm filter and the round's tally;
- ``aggregate``: weights, the aggregation pipeline, the server optimizer and server steps;
- ``evaluate``: central and federated evaluation;
- ``measure`` and ``hooks``: the round hooks, each under its `phase` attribute (the debug
  measurements say ``measure``; every other hook counts as ``hooks``);
- ``commit``: the store's commit on the round's critical path (with the background writer:
  handing the round over, plus waiting for the previous round's commit to finish).

`RoundRecord.extra["phases"]` holds every phase but the commit (the record is what gets
committed); `Coordinator.phase_log` holds, for the last `LOG_ROUNDS` rounds, every phase
including the commit.  The figures are wall seconds of a shared machine: for people and
benchmarks (benchmarks/overhead.py), never for a test to assert on.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator

PHASES_KEY = "phases"  # record.extra[PHASES_KEY]
LOG_ROUNDS = 1000


def phase_of(hook: object) -> str:
    """The phase a round hook's time counts under: its optional `phase` attribute, else "hooks"
    (a hook is any object with `after_round`; the phase is the timer's concern, not the engine's)."""
    return getattr(hook, "phase", "hooks")


class PhaseTimer:
    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.log: deque[dict[str, float]] = deque(maxlen=LOG_ROUNDS)

    def begin(self) -> None:
        """A new round starts timing."""
        self.current = {}

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] = self.current.get(phase, 0.0) + float(seconds)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def snapshot(self) -> dict[str, float]:
        """The phases so far, rounded to the microsecond (what the record carries)."""
        return {k: round(v, 6) for k, v in self.current.items()}

    def end(self) -> dict[str, float]:
        """Close the round: its phases go to the log."""
        out = dict(self.current)
        self.log.append(out)
        self.current = {}
        return out
