"""The Ray backend: the simulation transport with local training on a Ray cluster.

Same Transport contract, same virtual clock, same Coordinator, same client device.
What runs where:

- driver (this process): everything `SimulationTransport.dispatch` does except the
  training -- availability, who drops out and when, partial-work step limits,
  adaptive-compression levels and the virtual-clock arrival times.  It is reused by
  composition (`_RaySimulation` overrides only `_train` and `_encode`), so the Ray
  backend cannot drift from the in-process one.
- workers (`CohortWorker` actors, one CPU each): the FederatedData, the client
  `Device` (learner, codec chains, personalization) and the simulated attack are put
  in the object store once (`ray.put`); each dispatch cuts the cohort into one
  contiguous chunk per worker and every worker runs its chunk through the same
  `Device.train` (batched) with the same per-client seeds
  (`client_seed(seed, round, client)`) and, unless the driver must act between
  training and encoding, the same `Device.encode`.

Per-client state (error-feedback residuals, stochastic-codec streams, SCAFFOLD's c_i,
personal heads and models) stays on the driver, in the device's two `ClientStateStore`s:
the chunk carries its clients' states to the worker and the new states come back with
the results.  Any worker may therefore train any client in any round, and a worker that
dies loses no state.  (The alternative, actors keyed by client, would save shipping the
states but pin clients to actors.)  With adaptive compression the rung is chosen on the
driver after training (it depends on each client's processed samples), and a simulated
attacker replaces its delta after training, so in those cases workers return the deltas
and the driver encodes.

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

from ..client import ClientStateStore, Device, Trained
from ..data import FederatedData
from ..devices import Fleet
from ..messages import Dropout, Task, Update
from ..task_spec import AdaptiveEntry
from .base import Reply, TransportBase
from .simulation import SimulationTransport

INSTALL_HINT = 'the Ray backend needs Ray: pip install "fleetlearn[ray]" (or pip install "ray[default]>=2.9")'


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None
    return ray


def split_chunks(n: int, parts: int) -> list[slice]:
    """`parts` contiguous, near-equal, non-empty slices of range(n) (fewer if n < parts)."""
    parts = max(1, min(parts, n))
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# (id(data), workers, seed) -> [the CohortWorker actors, how many open RayTransports use them]
_POOLS: dict[tuple[int, int, int], list] = {}


class CohortWorker:
    """What runs on a Ray worker: a `SimulationTransport` view of the same data (for its
    `client_data`, with a simulated attack's poisoning) and the same client device."""

    def __init__(self, data: FederatedData, device: Device, fleet: Fleet, attack, seed: int, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.sim = SimulationTransport(data, device, fleet, seed, attack=attack)

    def train(
        self, task: Task, clients: list[int], seeds: list[int], limits: list[int | None],
        states: dict[int, dict[str, torch.Tensor]], personal: dict[int, dict[str, torch.Tensor]], encode: bool,
        device: Device | None = None, attack: Any = None,
    ) -> tuple[Trained, list | None, dict[int, Any], dict[int, Any]]:
        """Train a chunk (its clients' `states` and `personal` states in, the new ones out);
        with `encode`, also encode each client's Update (the dense deltas then stay here).
        `device` / `attack`: the calling transport's (workers are shared by the transports of
        one process over the same data, e.g. a canary's two arms); None: the ones built with."""
        if device is not None:
            self.sim.device, self.sim.attack = device, attack
        device = self.sim.device
        device.states, device.personal_states = ClientStateStore(), ClientStateStore()
        device.states.merge(clients, states)
        device.personal_states.merge(clients, personal)
        data = [self.sim._client_data_for(c, task.round) for c in clients]
        trained = device.train(task, clients, data, seeds, limits)
        updates = device.encode(task, trained) if encode else None
        if encode:  # the encoded Update is what travels back; the dense delta is not needed any more
            empty = torch.empty(0)
            trained.results = [dataclasses.replace(r, delta=empty) for r in trained.results]
        # The examples stay here; the driver gets each client's size and labels (a label histogram).
        trained.own = [_Own(d.num_examples, d.y) for d in trained.own]
        return trained, updates, device.states.take(clients), device.personal_states.take(clients)


@dataclass(frozen=True)
class _Own:
    """A client's own data as the driver sees it: its size and labels, not its examples."""

    num_examples: int
    y: Any = None


class _RaySimulation(SimulationTransport):
    """The driver's simulation: identical, except that training (and, when the driver
    has nothing to do between training and encoding, encoding) runs on the workers."""

    owner: "RayTransport"

    def _train(self, task: Task, clients: np.ndarray, seeds: list[int], limits: list[int | None]) -> Trained:
        return self.owner._train_remote(task, clients.tolist(), seeds, limits)

    def _encode(self, task: Task, trained: Trained, levels: list[int | None]) -> list:
        done = self.owner._encoded
        if done is not None and all(lv is None for lv in levels):
            return done
        return self.device.encode(task, trained, levels)


class RayTransport(TransportBase):
    """`[engine] backend = "ray"`: SimulationTransport semantics, training on Ray.

    `address`: None starts a local Ray cluster with `num_cpus` CPUs (all if None);
    "auto" joins the cluster this machine belongs to; "ray://host:10001" connects
    through Ray Client.  A Ray already initialised in this process is used as is.
    `num_workers`: training actors (default: the cluster's CPUs).  Every node needs
    fleetlearn importable (installed, or `runtime_env={"py_modules": [...]}`)."""

    name = "ray"

    def __init__(
        self, data: FederatedData, device: Device, fleet: Fleet, seed: int,
        clock=None, heartbeat_timeout_s: float = 0.0, *, attack=None, address: str | None = None, num_workers: int | None = None,
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
        self.device = device
        self.attack = attack
        self._encoded: list | None = None
        self.sim = _RaySimulation(data, device, fleet, seed, clock=clock, heartbeat_timeout_s=heartbeat_timeout_s, attack=attack)
        self.sim.owner = self
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = int(num_workers) if num_workers else max(1, cpus)
        # The workers' device is a copy without the driver's per-client states (they travel with each chunk).
        worker_device = copy.copy(device)
        worker_device.states, worker_device.personal_states = ClientStateStore(), ClientStateStore()
        refs = [ray.put(obj) for obj in (data, worker_device, fleet, attack)]
        self._device_ref, self._attack_ref = refs[1], refs[3]
        # One pool of workers per (data, size) in this process: a second transport over the same
        # data (a canary's candidate arm) trains on the same actors with its own device, instead of
        # asking the cluster for CPUs the first one holds (on a full cluster it would wait forever).
        self._pool_key = (id(data), n, seed)
        pool = _POOLS.get(self._pool_key)
        if pool is None:
            actor = ray.remote(num_cpus=1)(CohortWorker)
            pool = _POOLS[self._pool_key] = [[actor.remote(*refs, seed, 1) for _ in range(n)], 0]
        pool[1] += 1
        self.workers = pool[0]
        self.data = data

    # -- Transport --------------------------------------------------------------
    @property
    def population(self) -> int:
        return self.sim.population

    @property
    def train_wall_seconds(self) -> float:
        return self.sim.train_wall_seconds

    @property
    def encode_wall_seconds(self) -> float:
        return self.sim.encode_wall_seconds

    @property
    def clock(self):
        return self.sim.clock

    @clock.setter
    def clock(self, value) -> None:
        self.sim.clock = value

    def available(self, round: int) -> Sequence[int]:
        return self.sim.available(round)

    @property
    def last_malicious(self) -> list[int]:
        return self.sim.last_malicious

    def dispatch(self, task: Task, cohort: Sequence[int]) -> Iterator[Reply]:
        self._encoded = None
        try:
            yield from self.sim.dispatch(task, cohort)
        finally:
            self._encoded = None

    def close(self) -> None:
        """Stop the workers (when no other transport of this process trains on them); shut Ray
        down if this transport started it."""
        pool = _POOLS.get(getattr(self, "_pool_key", None))
        if pool is not None and pool[0] is getattr(self, "workers", None):
            pool[1] -= 1
            if pool[1] <= 0:
                del _POOLS[self._pool_key]
                for w in pool[0]:
                    self._ray.kill(w)
        self.workers = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns_ray = False

    # -- training on the workers ------------------------------------------------
    def _encode_on_workers(self, task: Task) -> bool:
        """Workers encode unless the driver acts between training and encoding: adaptive
        rungs (chosen from each client's processed samples) or attackers replacing deltas."""
        adaptive = self.device.adaptive is not None and task.spec.get(AdaptiveEntry) is not None
        return not adaptive and not (self.attack is not None and self.attack.replaces_updates)

    def _train_remote(self, task: Task, clients: list[int], seeds: list[int], limits: list[int | None]) -> Trained:
        if not clients:
            self._encoded = []
            return Trained([], [], [], [])
        ray, device = self._ray, self.device
        encode = self._encode_on_workers(task)
        task_ref = ray.put(task)
        calls = []
        for k, sl in enumerate(split_chunks(len(clients), len(self.workers))):
            ids = clients[sl]
            calls.append((ids, self.workers[k].train.remote(
                task_ref, ids, seeds[sl], limits[sl], device.states.take(ids), device.personal_states.take(ids), encode,
                self._device_ref, self._attack_ref)))
        out = Trained([], [], [], [])
        encoded: list = []
        for ids, ref in calls:
            trained, updates, states, personal = ray.get(ref)
            device.states.merge(ids, states)
            device.personal_states.merge(ids, personal)
            out.clients += trained.clients
            out.results += trained.results
            out.own += trained.own
            out.added += trained.added
            if updates is not None:
                encoded += updates
        self._encoded = encoded if encode else None
        return out

    def __repr__(self) -> str:
        return f"RayTransport(workers={len(self.workers)}, pid={os.getpid()})"
