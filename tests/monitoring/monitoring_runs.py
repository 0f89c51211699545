"""The small run configuration and the fault injector the monitoring tests share
(a module of its own: `conftest` is not importable by name when several test
folders have one)."""

from __future__ import annotations

import torch

SMALL = {"seed": 0, "data": {"clients": 20}, "server": {"rounds": 12, "cohort": 5}, "client": {"local_epochs": 1}}
FAULT_ROUNDS = {4: "scale", 5: "nan"}


class InjectFault:
    """Corrupts the global model after chosen rounds, as a broken server step would."""

    def __init__(self, rounds: dict[int, str]):
        self.rounds = rounds
        self.norm_after_fault: dict[int, float] = {}

    def after_round(self, record, coordinator) -> None:
        kind = self.rounds.get(record.round)
        if kind == "scale":
            coordinator.params = coordinator.params * 1e3
        elif kind == "nan":
            p = coordinator.params.clone()
            p[::7] = float("nan")
            coordinator.params = p
        if kind:
            self.norm_after_fault[record.round] = float(torch.linalg.vector_norm(coordinator.params))
