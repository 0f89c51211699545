"""The Transport contract: deliver a Task to a cohort, yield replies as they arrive.

A transport only moves messages.  It never aggregates, never validates and never
touches the model; the Coordinator does that with whatever arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

from ..messages import Dropout, Task, Update


@dataclass(frozen=True)
class Reply:
    message: Update | Dropout
    elapsed_s: float  # seconds from dispatch to arrival (simulated or real)


class Transport(Protocol):
    name: str

    @property
    def population(self) -> int: ...

    def available(self, round: int) -> Sequence[int]:
        """Clients that can be selected this round."""
        ...

    def dispatch(self, task: Task, cohort: Sequence[int]) -> Iterator[Reply]:
        """Send `task` to every client of `cohort`; yield replies in arrival order,
        ending when all have replied or dropped, or `task.deadline_s` has passed."""
        ...


class TransportBase:
    """What every transport has besides the `Transport` contract, with the defaults of a
    transport that has nothing to say (the engine asks every transport the same way)."""

    name = "transport"
    realtime = False  # replies arrive in wall-clock time (the engine stops waiting once a cohort is filled)
    train_wall_seconds = 0.0  # wall time spent in local training in the last dispatch (simulations)
    last_malicious: Sequence[int] = ()  # simulated attackers in the last dispatch

    def secure_aggregation(self):
        """The remote half of secure aggregation when the clients hold their updates and mask
        them themselves (an object with ``secure_sum(round, clients, weights, recipe, secure)
        -> privacy.secagg.RemoteSum``), or None when the updates reach the server and it runs
        the protocol in-process (the simulation)."""
        return None

    def take_refusals(self) -> dict[str, int] | None:
        """Messages refused since the last call, by reason (None: this transport refuses none)."""
        return None

    def client_ids(self) -> Sequence[int]:
        """The population's client ids (what a canary rollout splits into its arms):
        0..population-1 unless the transport names its clients otherwise."""
        return range(self.population)  # type: ignore[attr-defined]

    def wait_available(self, min_clients: int, timeout_s: float) -> list[int]:
        """Block until `min_clients` are available or `timeout_s` passes; returns them."""
        return list(self.available(0))  # type: ignore[attr-defined]
