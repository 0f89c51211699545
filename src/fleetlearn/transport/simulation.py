"""In-process simulation on a virtual clock.

Every selected client trains for real (the cohort as one batched computation when
the learner can), and its reply is stamped with the simulated time it would take
a device with its profile: download + compute + upload, from the real byte sizes
of the messages.  Devices may be offline (diurnal availability), abandon a task
mid-round (dropout) or go offline while training; with partial work, a client
that cannot finish before the deadline trains fewer steps.  Nothing sleeps:
replies are yielded sorted by their simulated arrival time.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Iterator, Sequence

import numpy as np
import torch

from ..client import Device, Trained
from ..data import FederatedData
from ..devices import Fleet
from ..learners.base import ClientData, CohortData, FitConfig, Learner
from ..messages import Dropout, Task
from ..task_spec import AdaptiveEntry
from .base import Reply, TransportBase


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def client_seeds(seed: int, round: int, clients) -> list[int]:
    """Per-(run, round, client) seeds for many clients at once (63-bit, independent of
    execution order and of who else is in the cohort): splitmix64 chained over the
    run seed, the round and the client id."""
    c = np.asarray(clients, dtype=np.int64).reshape(-1).astype(np.uint64)
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        head = _mix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + golden)
        head = _mix64(head ^ (np.array([int(round) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + golden))
        out = _mix64(head ^ (c + golden)) >> np.uint64(1)
    return out.astype(np.int64).tolist()


def client_seed(seed: int, round: int, client: int) -> int:
    """A per-(run, round, client) seed, independent of execution order (`client_seeds`)."""
    return client_seeds(seed, round, [client])[0]


class SimulationTransport(TransportBase):
    name = "simulation"

    def __init__(
        self, data: FederatedData, device: Device, fleet: Fleet, seed: int,
        clock=None, heartbeat_timeout_s: float = 0.0, attack=None,
    ):
        self.data = data
        self.device = device  # the one client device: trains the cohort and encodes its updates
        self.learner = device.learner
        self.fleet = fleet
        self.seed = seed
        self.clock = clock  # anything with `.now` (the Coordinator's VirtualClock)
        self.heartbeat_timeout_s = heartbeat_timeout_s  # a silent device is noticed this long after
        self.train_wall_seconds = 0.0  # wall time spent in local training, last dispatch
        self.encode_wall_seconds = 0.0  # wall time spent encoding the updates, last dispatch
        self._uplink_estimate: int | None = None  # bytes of the last update, for partial-work budgets
        # -- attack simulation (fleetlearn.attacks.Attack or None) --
        self.attack = attack
        self.last_malicious: list[int] = []  # clients that attacked in the last dispatch

    @property
    def now(self) -> float:
        return float(self.clock.now) if self.clock is not None else 0.0

    @property
    def population(self) -> int:
        return self.data.num_clients

    def available(self, round: int) -> Sequence[int]:
        if self.fleet.always_online:
            return range(self.data.num_clients)
        return np.flatnonzero(self.fleet.online(np.arange(self.data.num_clients), self.now))

    def client_data(self, client: int) -> ClientData:
        tr = torch.from_numpy(self.data.train_indices(client))
        te = torch.from_numpy(self.data.test_indices(client))
        return ClientData(self.data.x[tr], self.data.y[tr], self.data.x[te], self.data.y[te])

    def _client_data_for(self, client: int, round: int) -> ClientData:
        """The data `client` trains on: its own, or poisoned by a simulated attack (label_flip)."""
        data = self.client_data(client)
        return data if self.attack is None else self.attack.poison_data(client, data, round)

    def planned_samples(self, clients: np.ndarray, hp: FitConfig) -> np.ndarray:
        """Examples each client would process in a full local run (before any cut)."""
        n = self.data.train_sizes()[clients].astype(np.float64)
        if hp.local_steps is None:
            return hp.local_epochs * n
        steps_per_epoch = np.maximum(1, np.ceil(n / hp.batch_size))
        full = np.floor(hp.local_steps / steps_per_epoch) * n
        rest = np.minimum((hp.local_steps % steps_per_epoch) * hp.batch_size, n)
        return full + rest

    def _levels(self, task: Task, ids: np.ndarray, train: np.ndarray, down_s: np.ndarray, results, cost: np.ndarray) -> list[int | None]:
        """Adaptive compression: each client's ladder rung from its uplink and its time
        budget (fleetlearn.compression.adaptive): `pace` (finish near the earliest end
        of the round) or `upload_budget` (the round's budget minus download and compute).
        `cost` scales compute for sub-models (HeteroFL)."""
        policy = self.device.adaptive
        entry = task.spec.get(AdaptiveEntry)
        if policy is None or entry is None or not len(train):
            return [None] * len(train)
        c = ids[train]
        before = down_s[train] + self.fleet.compute_seconds(c, np.array([r.samples for r in results]) * cost[train])
        plan = policy.plan_task(entry, self.fleet.uplink_mbps[c], self.fleet.latency_s[c], before)
        return [None] * len(train) if plan is None else [int(v) for v in plan.levels]

    def cohort_data(self, clients) -> CohortData:
        """`client_data` of many clients, gathered with one index operation per array: the
        cohort's rows in cohort order, each client's `ClientData` a view made when asked for
        (a learner that trains the cohort at once reads the gathered tensors whole)."""
        clients = np.asarray(clients, dtype=np.int64).reshape(-1)
        d = self.data
        parts = []
        for order, offsets in ((d.train_order, d.train_offsets), (d.test_order, d.test_offsets)):
            lo, hi = offsets[clients], offsets[clients + 1]
            sizes = hi - lo
            ends = np.cumsum(sizes)
            starts = ends - sizes
            # Positions in `order` of every client's rows, concatenated in cohort order.
            pos = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(starts - lo, sizes)
            rows = torch.from_numpy(order[pos])
            parts.append((d.x[rows], d.y[rows], sizes))
        (x, y, sizes), (xt, yt, test_sizes) = parts
        return CohortData(x, y, xt, yt, sizes, test_sizes)

    def _train(self, task: Task, clients: np.ndarray, seeds: list[int], limits: list[int | None]) -> Trained:
        """The cohort's local training on the device (the Ray backend trains on its workers)."""
        if self.attack is None:
            data = self.cohort_data(clients)
        else:  # a simulated attack poisons its clients' data (label_flip)
            data = [self._client_data_for(int(c), task.round) for c in clients]
        return self.device.train(task, clients.tolist(), data, seeds, limits)

    def _encode(self, task: Task, trained: Trained, levels: list[int | None]) -> list:
        """The cohort's updates, encoded on the device (Ray: already encoded on its workers)."""
        return self.device.encode(task, trained, levels)

    def dispatch(self, task: Task, cohort: Sequence[int]) -> Iterator[Reply]:
        ids = np.asarray([int(c) for c in cohort], dtype=np.int64)
        params, hp = self.device.receive(task)
        n = len(ids)
        # HeteroFL: a client of a sub-model downloads, computes and uploads its share only.
        sub_cost = getattr(self.learner, "relative_cost", None)
        cost = sub_cost(ids) if sub_cost is not None else np.ones(n)
        down_bytes = self.learner.downlink_nbytes(ids, params, self.device.downlink, task.version) if sub_cost is not None else np.full(n, task.nbytes)
        down_s = self.fleet.download_seconds(ids, down_bytes)
        planned = self.planned_samples(ids, hp)
        up_guess = np.ceil((self._uplink_estimate or task.nbytes) * cost)  # before anyone replied

        # Partial work: cut each client's steps to what fits before the deadline.
        limits: list[int | None] = [None] * n
        if task.deadline_s is not None and task.spec.partial_work:
            budget = task.deadline_s - down_s - self.fleet.upload_seconds(ids, up_guess)
            fit_samples = np.maximum(budget, 0.0) * self.fleet.compute_sps[ids] / cost
            cut = fit_samples < planned
            limits = [int(math.floor(s / hp.batch_size)) if c else None for s, c in zip(fit_samples, cut)]

        # Who abandons the task, and when (seeded per round, independent of training).
        rng = np.random.default_rng([self.seed, task.round, 0xD20])
        u, frac = rng.random(n), rng.random(n)
        compute_s = self.fleet.compute_seconds(ids, planned * cost)
        drop_at = np.full(n, np.inf)
        reasons = [""] * n
        quits = u < self.fleet.dropout_prob(ids)
        drop_at[quits] = down_s[quits] + frac[quits] * compute_s[quits]
        for i in np.flatnonzero(quits):
            reasons[i] = f"dropout: abandoned the task {drop_at[i]:.3f}s into the round"
        offline = self.fleet.offline_after(ids, self.now)
        goes = offline < drop_at
        # A device that goes offline before its reply would have arrived is lost too.
        full_s = down_s + compute_s + self.fleet.upload_seconds(ids, up_guess)
        goes &= offline < full_s
        drop_at[goes] = offline[goes]
        for i in np.flatnonzero(goes):
            reasons[i] = f"offline: device went offline {offline[i]:.3f}s into the round"
        zero = np.array([lim is not None and lim <= 0 for lim in limits])
        for i in np.flatnonzero(zero & ~np.isfinite(drop_at)):
            drop_at[i] = down_s[i]
            reasons[i] = "no time: the deadline leaves no time for a single step"

        train = np.flatnonzero(~np.isfinite(drop_at))
        t0 = time.perf_counter()
        seeds = client_seeds(self.seed, task.round, ids[train])
        trained = self._train(task, ids[train], seeds, [limits[i] for i in train])
        self.train_wall_seconds = time.perf_counter() - t0
        results = trained.results
        self.last_malicious = []
        if self.attack is not None:  # attackers replace their deltas after training, before encoding
            trained.results, self.last_malicious = self.attack.apply_results(ids[train], results, task.round)
            results = trained.results
        t1 = time.perf_counter()
        levels = self._levels(task, ids, train, down_s, results, cost)
        down_list = down_bytes.tolist()
        updates = [u if u.downlink_bytes == down_list[i] else replace(u, downlink_bytes=int(down_list[i]))
                   for i, u in zip(train.tolist(), self._encode(task, trained, levels))]
        self.encode_wall_seconds = time.perf_counter() - t1
        sent = [(i, u) for i, u in zip(train, updates) if not isinstance(u, Dropout)]
        if sent:
            self._uplink_estimate = int(max(u.uplink_bytes / cost[i] for i, u in sent))  # full-model equivalent
        elapsed = drop_at + self.heartbeat_timeout_s  # when the server notices the silence
        if len(train):
            elapsed[train] = (
                down_s[train]
                + self.fleet.compute_seconds(ids[train], np.array([r.samples for r in results]) * cost[train])
                + self.fleet.upload_seconds(ids[train], np.array([0 if isinstance(u, Dropout) else u.uplink_bytes for u in updates]))
            )
        by_index = dict(zip(train.tolist(), updates))
        # Late replies are yielded too (they would reach a real server as well);
        # the Coordinator owns the deadline and refuses them.
        at = elapsed.tolist()
        for i in np.argsort(elapsed, kind="stable").tolist():
            msg = by_index.get(i) or Dropout(int(ids[i]), task.round, reasons[i], int(down_list[i]))
            yield Reply(msg, at[i])
