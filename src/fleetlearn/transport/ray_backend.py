"""The Ray backend: the simulation transport with local training on a Ray cluster.

Same Transport contract, same virtual clock, same Coordinator.  What runs where:

- driver (this process): everything `SimulationTransport.dispatch` does except the
  training -- availability, who drops out and when, partial-work step limits,
  adaptive-compression levels and the virtual-clock arrival times.  It is reused by
  composition (`_RemoteTrainingSimulation` overrides only `client_data`, so the
  cohort travels as client ids), so the Ray backend cannot drift from the
  in-process one.
- workers (`CohortWorker` actors, one CPU each): the FederatedData, the learner,
  the fleet and the client runtime are put in the object store once
  (`ray.put`); each dispatch cuts the cohort into one contiguous chunk per worker
  and every worker trains its chunk with the same `Learner.fit_cohort` (batched),
  the same per-client seeds (`client_seed(seed, round, client)`) and encodes the
  Updates with the same `ClientRuntime` code.

Per-client codec state (error-feedback residuals, stochastic-codec streams) stays
on the driver, in the runtime's `ClientStateStore`: the chunk carries its clients'
states to the worker and the new states come back with the Updates.  Any worker
may therefore train any client in any round, and a worker that dies loses no
state.  (The alternative, actors keyed by client, would save shipping the states
but pin clients to actors.)  With adaptive compression the rung is chosen on the
driver after training (it depends on each client's processed samples), so in that
case workers return the deltas and the driver encodes.

Same seed, same model as the in-process backend (tests/scale/test_ray_backend.py).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..client import ClientRuntime, ClientStateStore
from ..data import FederatedData
from ..devices import Fleet
from ..learners.base import FitConfig, FitResult, Learner
from ..messages import Task, Update
from .base import Reply, TransportBase
from .simulation import SimulationTransport

INSTALL_HINT = 'the Ray backend needs Ray: pip install "fleetlearn[ray]" (or pip install "ray[default]>=2.9")'


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None
    return ray


@dataclass(frozen=True)
class ClientRef:
    """A client as the driver's simulation hands it to training: its id, not its data
    (the workers hold the data)."""

    client: int


def split_chunks(n: int, parts: int) -> list[slice]:
    """`parts` contiguous, near-equal, non-empty slices of range(n) (fewer if n < parts)."""
    parts = max(1, min(parts, n))
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class CohortWorker:
    """What runs on a Ray worker: a `SimulationTransport` view of the same data, used
    for its `client_data`, and the same learner and client runtime as the driver."""

    def __init__(self, data: FederatedData, learner: Learner, fleet: Fleet, runtime: ClientRuntime, seed: int, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.sim = SimulationTransport(data, learner, fleet, runtime, seed)

    def train(
        self, params: torch.Tensor, clients: list[int], hp: FitConfig, seeds: list[int], step_limits: list[int | None] | None,
        task: Task | None, states: dict[int, dict[str, torch.Tensor]],
    ) -> tuple[list[FitResult], list[Update] | None, dict[int, Any]]:
        """Train a chunk; with `task`, also encode each client's Update (`states` in, new states out)."""
        cohort = [self.sim.client_data(c) for c in clients]
        results = self.sim.learner.fit_cohort(params, cohort, hp, seeds, step_limits=step_limits)
        if task is None:
            return results, None, {}
        runtime = self.sim.runtime
        runtime.states = ClientStateStore()
        for c, s in states.items():
            runtime.states.put(c, s)
        updates = [runtime.reply(c, task, r) for c, r in zip(clients, results)]
        new_states = {c: runtime.states.get(c) for c in clients}
        empty = torch.empty(0)
        # The encoded Update is what travels back; the dense delta is not needed any more.
        return [dataclasses.replace(r, delta=empty) for r in results], updates, new_states


class _RemoteCohortLearner:
    """Stands in for the learner inside the driver's simulation: `fit_cohort` fans
    the cohort out to the Ray workers, chunk by chunk, and gathers the results in order."""

    def __init__(self, owner: "RayTransport", learner: Learner):
        self.owner = owner
        self.spec = learner.spec

    def fit_cohort(self, params, cohort: list[ClientRef], hp, seeds, corrections=None, step_limits=None) -> list[FitResult]:
        if corrections is not None:
            raise NotImplementedError("the Ray backend does not ship gradient corrections (SCAFFOLD) yet")
        if not cohort:
            return []
        return self.owner._train_remote(params, [c.client for c in cohort], hp, list(seeds), step_limits)


class _RemoteRuntime:
    """Stands in for the ClientRuntime inside the driver's simulation: an Update the
    worker already encoded is handed over (and its client's new state kept on the
    driver); otherwise (an adaptive-compression rung) the driver encodes."""

    def __init__(self, owner: "RayTransport", runtime: ClientRuntime):
        self.owner = owner
        self.runtime = runtime

    def __getattr__(self, name):  # receive, adaptive, states, ... are the real runtime's
        return getattr(self.runtime, name)

    def reply(self, client: int, task: Task, result: FitResult, level: int | None = None, **client_side) -> Update:
        done = self.owner._encoded.pop(client, None)
        if done is not None and level is None:
            update, state = done
            self.runtime.states.put(client, state)
            return update
        return self.runtime.reply(client, task, result, level, **client_side)


class _RemoteTrainingSimulation(SimulationTransport):
    """The driver's simulation: identical, except that a cohort member is a `ClientRef`."""

    def client_data(self, client: int) -> ClientRef:  # type: ignore[override]
        return ClientRef(int(client))


class RayTransport(TransportBase):
    """`[engine] backend = "ray"`: SimulationTransport semantics, training on Ray.

    `address`: None starts a local Ray cluster with `num_cpus` CPUs (all if None);
    "auto" joins the cluster this machine belongs to; "ray://host:10001" connects
    through Ray Client.  A Ray already initialised in this process is used as is.
    `num_workers`: training actors (default: the cluster's CPUs).  Every node needs
    fleetlearn importable (installed, or `runtime_env={"py_modules": [...]}`)."""

    name = "ray"

    def __init__(
        self, data: FederatedData, learner: Learner, fleet: Fleet, runtime: ClientRuntime, seed: int,
        clock=None, heartbeat_timeout_s: float = 0.0, *, address: str | None = None, num_workers: int | None = None,
        num_cpus: int | None = None, runtime_env: dict | None = None,
    ):
        ray = _import_ray()
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if runtime_env is not None:
                kwargs["runtime_env"] = runtime_env
            if address is None:
                ray.init(num_cpus=num_cpus, **kwargs)
            else:
                ray.init(address=address, **kwargs)
            self._owns_ray = True
        self.runtime = runtime
        self._encoded: dict[int, tuple[Update, Any]] = {}
        self._task: Task | None = None
        self.sim = _RemoteTrainingSimulation(
            data, _RemoteCohortLearner(self, learner), fleet, _RemoteRuntime(self, runtime), seed,
            clock=clock, heartbeat_timeout_s=heartbeat_timeout_s,
        )
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = int(num_workers) if num_workers else max(1, cpus)
        # The worker's runtime is a copy without the driver's per-client states (they travel with each chunk).
        worker_runtime = copy.copy(runtime)
        worker_runtime.states = ClientStateStore()
        refs = [ray.put(obj) for obj in (data, learner, fleet, worker_runtime)]
        actor = ray.remote(num_cpus=1)(CohortWorker)
        self.workers = [actor.remote(*refs, seed, 1) for _ in range(n)]
        self.data = data

    # -- Transport --------------------------------------------------------------
    @property
    def population(self) -> int:
        return self.sim.population

    @property
    def train_wall_seconds(self) -> float:
        return self.sim.train_wall_seconds

    @property
    def clock(self):
        return self.sim.clock

    @clock.setter
    def clock(self, value) -> None:
        self.sim.clock = value

    def available(self, round: int) -> Sequence[int]:
        return self.sim.available(round)

    def dispatch(self, task: Task, cohort: Sequence[int]) -> Iterator[Reply]:
        self._task, self._encoded = task, {}
        try:
            yield from self.sim.dispatch(task, cohort)
        finally:
            self._task, self._encoded = None, {}

    def close(self) -> None:
        """Stop the workers; shut Ray down if this transport started it."""
        for w in getattr(self, "workers", []):
            self._ray.kill(w)
        self.workers = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns_ray = False

    # -- training on the workers ------------------------------------------------
    def _encode_on_workers(self, task: Task) -> bool:
        # Adaptive rungs depend on each client's processed samples: chosen on the driver after training.
        return self.runtime.adaptive is None or (task.config.get("adaptive_policy") != "pace" and task.config.get("upload_budget_s") is None)

    def _train_remote(self, params: torch.Tensor, clients: list[int], hp: FitConfig, seeds: list[int], step_limits) -> list[FitResult]:
        ray, task = self._ray, self._task
        encode = task is not None and self._encode_on_workers(task)
        params_ref = ray.put(params)
        calls = []
        for k, sl in enumerate(split_chunks(len(clients), len(self.workers))):
            ids = clients[sl]
            states = {c: self.runtime.states.get(c) for c in ids} if encode else {}
            limits = step_limits[sl] if step_limits is not None else None
            calls.append((ids, self.workers[k].train.remote(params_ref, ids, hp, seeds[sl], limits, task if encode else None, states)))
        results: list[FitResult] = []
        for ids, ref in calls:
            chunk, updates, states = ray.get(ref)
            results.extend(chunk)
            if updates is not None:
                for c, u in zip(ids, updates):
                    self._encoded[c] = (u, states.get(c))
        return results

    def __repr__(self) -> str:
        return f"RayTransport(workers={len(self.workers)}, pid={os.getpid()})"
