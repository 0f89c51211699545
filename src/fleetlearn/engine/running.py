"""What runs around the rounds: the synchronous driver (`SyncRounds`) and what a run
sets for its duration (torch's intra-op threads, the monitoring endpoint)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..records import RoundRecord

AUTO_THREADS_MAX_DIM = 100_000  # engine.threads = "auto": one thread up to this many parameters


def run_threads(setting: int | str, dim: int) -> int:
    """The torch intra-op threads for a run (0: leave torch's setting alone)."""
    if setting == "auto":
        return 1 if dim <= AUTO_THREADS_MAX_DIM else 0
    return int(setting)


@contextmanager
def running(c) -> Iterator[None]:
    """While a run executes: its torch threads (`engine.threads`) and its monitoring
    (Prometheus endpoint); both are put back afterwards."""
    threads_before = torch.get_num_threads()
    threads = run_threads(c.config.engine.threads, c.dim)
    if threads:
        torch.set_num_threads(threads)
    if c.monitoring is not None:
        c.monitoring.start()
    try:
        yield
    finally:
        if c.monitoring is not None:
            c.monitoring.stop()
        torch.set_num_threads(threads_before)


class SyncRounds:
    """The synchronous driver: one round after another until `server.rounds`, each after
    the clients are ready (`clients_ready`) and while the privacy budget allows it."""

    def __init__(self, coordinator):
        self.c = coordinator

    def run(self, on_round: Callable[[RoundRecord], Any] | None = None) -> None:
        c = self.c
        while c.round < c.config.server.rounds:
            if not c.clients_ready() or c.budget_exhausted():
                break
            record = c.run_round()
            if on_round is not None:
                on_round(record)
