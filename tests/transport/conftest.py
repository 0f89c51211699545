"""Fixtures for the gRPC transport tests: a real server on 127.0.0.1 (free port),
a token store in a temporary state dir, and a tiny model."""

from __future__ import annotations

import threading
from typing import Iterator

import pytest
import torch

from fleetlearn.compression import parse_chain
from fleetlearn.learners import ClientData, TorchLearner, logistic
from fleetlearn.messages import Task
from fleetlearn.transport.grpc import GrpcTransport, TokenStore

FEATURES, CLASSES = 4, 3


@pytest.fixture
def learner() -> TorchLearner:
    return TorchLearner(lambda: logistic(FEATURES, CLASSES), vectorize=False)


def tiny_data(seed: int, n: int = 24) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return ClientData(x[:-6], y[:-6], x[-6:], y[-6:])


def make_task(round: int, version: int, params: torch.Tensor, deadline_s: float | None = 5.0, **config) -> Task:
    payload, _ = parse_chain("none").encode(params)
    hp = {"lr": 0.1, "local_epochs": 2, "batch_size": 4, "seed": 7, **config}
    return Task(round=round, version=version, payload=payload, codec="none", config=hp, deadline_s=deadline_s)


@pytest.fixture
def tokens(tmp_path) -> Iterator[TokenStore]:
    store = TokenStore.open(tmp_path / "state")
    yield store
    store.close()


@pytest.fixture
def transport(tokens, learner) -> Iterator[GrpcTransport]:
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, heartbeat_interval_s=0.2, max_round_s=20.0)
    yield t
    t.close(grace_s=0.2)


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
