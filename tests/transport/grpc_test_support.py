"""Helpers shared by the gRPC transport tests (a uniquely named module: `conftest` is
not importable by name when several test folders have one)."""

from __future__ import annotations

import threading

import torch

from fleetlearn.compression import parse_chain
from fleetlearn.learners import ClientData
from fleetlearn.messages import Task
from fleetlearn.transport.grpc import GrpcTransport

FEATURES, CLASSES = 4, 3


def tiny_data(seed: int, n: int = 24) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return ClientData(x[:-6], y[:-6], x[-6:], y[-6:])


def make_task(round: int, version: int, params: torch.Tensor, deadline_s: float | None = 5.0, **config) -> Task:
    payload, _ = parse_chain("none").encode(params)
    hp = {"lr": 0.1, "local_epochs": 2, "batch_size": 4, "seed": 7, **config}
    return Task(round=round, version=version, payload=payload, codec="none", config=hp, deadline_s=deadline_s)


class DispatchThread:
    """Runs `transport.dispatch` on a thread (as the Coordinator would) and records the replies."""

    def __init__(self, transport: GrpcTransport, task: Task, cohort):
        self.replies = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(transport, task, list(cohort)), daemon=True)
        self._thread.start()

    def _run(self, transport, task, cohort) -> None:
        try:
            for r in transport.dispatch(task, cohort):
                self.replies.append(r)
        except BaseException as exc:  # noqa: BLE001 - re-raised in join
            self.error = exc

    def join(self, timeout: float = 20.0):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "dispatch did not end"
        if self.error is not None:
            raise self.error
        return self.replies
