"""Fixtures for the gRPC transport tests: a real server on 127.0.0.1 (free port),
a token store in a temporary state dir, and a tiny model."""

from __future__ import annotations

from typing import Iterator

import pytest
from grpc_test_support import CLASSES, FEATURES

from fleetlearn.learners import TorchLearner, logistic
from fleetlearn.transport.grpc import GrpcTransport, TokenStore


@pytest.fixture
def learner() -> TorchLearner:
    return TorchLearner(lambda: logistic(FEATURES, CLASSES), vectorize=False)


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
