"""In-process simulation on a virtual clock.

Every selected client trains for real (the cohort as one batched computation when
the learner can), and its reply is stamped with the simulated time it would take
a device with its profile: download + compute + upload, from the real byte sizes
of the messages.  Nothing sleeps: replies are yielded sorted by that time.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np
import torch

from ..client import ClientRuntime
from ..data import FederatedData
from ..devices import Fleet
from ..learners.base import ClientData, Learner
from ..messages import Task
from .base import Reply


def client_seed(seed: int, round: int, client: int) -> int:
    """A per-(run, round, client) seed, independent of execution order."""
    return int(np.random.SeedSequence([seed, round, client]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SimulationTransport:
    name = "simulation"

    def __init__(self, data: FederatedData, learner: Learner, fleet: Fleet, runtime: ClientRuntime, seed: int):
        self.data = data
        self.learner = learner
        self.fleet = fleet
        self.runtime = runtime
        self.seed = seed
        self.train_wall_seconds = 0.0  # wall time spent in local training, last dispatch

    @property
    def population(self) -> int:
        return self.data.num_clients

    def available(self, round: int) -> Sequence[int]:
        return range(self.data.num_clients)

    def client_data(self, client: int) -> ClientData:
        tr = torch.from_numpy(self.data.train_indices(client))
        te = torch.from_numpy(self.data.test_indices(client))
        return ClientData(self.data.x[tr], self.data.y[tr], self.data.x[te], self.data.y[te])

    def dispatch(self, task: Task, cohort: Sequence[int]) -> Iterator[Reply]:
        cohort = [int(c) for c in cohort]
        params, hp = self.runtime.receive(task)
        t0 = time.perf_counter()
        results = self.learner.fit_cohort(
            params,
            [self.client_data(c) for c in cohort],
            hp,
            [client_seed(self.seed, task.round, c) for c in cohort],
        )
        self.train_wall_seconds = time.perf_counter() - t0
        updates = [self.runtime.reply(c, task, r) for c, r in zip(cohort, results)]
        elapsed = self.fleet.completion_seconds(
            np.asarray(cohort),
            np.full(len(cohort), task.nbytes),
            np.array([u.metrics.samples for u in updates]),
            np.array([u.uplink_bytes for u in updates]),
        )
        # Late replies are yielded too (they would reach a real server as well);
        # the Coordinator owns the deadline and refuses them.
        for i in np.argsort(elapsed, kind="stable"):
            yield Reply(updates[i], float(elapsed[i]))
