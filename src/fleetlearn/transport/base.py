"""The Transport contract: deliver a Task to a cohort, yield replies as they arrive.

A transport only moves messages.  It never aggregates, never validates and never
touches the model; the Coordinator does that with whatever arrives.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from itertools import count
from typing import Iterator, Protocol, Sequence

from ..messages import Dropout, Task, Update


def missed_deadline(deadline_s: float) -> str:
    """The reason recorded for a client that did not reply before its task's deadline (every
    transport words it the same way: simulated task groups here, the gRPC server's timers)."""
    return f"no update before the deadline of {deadline_s:.3g}s"


@dataclass(frozen=True)
class Reply:
    message: Update | Dropout
    elapsed_s: float  # seconds from dispatch to arrival (simulated or real)


@dataclass(frozen=True)
class Arrival:
    """A reply from one of the open task groups (`Transport.open_group`)."""

    group: int  # the group's key: its task's round (FedBuff: the dispatch number)
    reply: Reply
    at: float  # the group's `start` + the reply's elapsed_s: its arrival on the driver's clock


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

    # -- overlapping dispatches (FedBuff: engine/fedbuff.py) ------------------------------
    # Several task groups may be open at once; replies come out of one stream, whatever
    # group they belong to.  `TransportBase` implements them for a virtual clock.

    def open_group(self, task: Task, cohort: Sequence[int], start: float) -> None:
        """Send `task` to `cohort` without waiting for the replies; the group is keyed by
        `task.round` and `start` is the driver's clock at dispatch (see `Arrival.at`)."""
        ...

    def next_arrival(self, timeout_s: float | None = None) -> Arrival | None:
        """The next reply of any open group (in arrival order); None when no group has
        replies left to come, or after `timeout_s`."""
        ...

    def arrival_due(self, now: float) -> bool:
        """Whether a reply has arrived by `now` that `next_arrival` returns without waiting
        (the driver handles it before dispatching, so clients freed together go together)."""
        ...

    def awaiting_replies(self) -> bool:
        """Whether some open group still has replies to give."""
        ...

    def close_groups(self, reason: str) -> None:
        """Stop collecting: every open group is closed (later replies are refused)."""
        ...


class TransportBase:
    """What every transport has besides the `Transport` contract, with the defaults of a
    transport that has nothing to say (the engine asks every transport the same way)."""

    name = "transport"
    realtime = False  # replies arrive in wall-clock time (the engine stops waiting once a cohort is filled)
    train_wall_seconds = 0.0  # wall time spent in local training in the last dispatch (simulations)
    encode_wall_seconds = 0.0  # wall time spent encoding the clients' updates in the last dispatch (simulations)
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

    # -- overlapping dispatches on a virtual clock ----------------------------------------
    # `open_group` runs `dispatch` to its end at once (a simulation trains the whole group
    # as one batched computation) and keeps its replies by simulated arrival time
    # (`start + elapsed_s`, ties in dispatch order): `next_arrival` hands them out in that
    # order.  A realtime transport (gRPC) overrides these with groups open on the network.

    def _arrival_heap(self) -> tuple[list, Iterator[int]]:
        state = self.__dict__.get("_arrivals")
        if state is None:
            state = self.__dict__["_arrivals"] = ([], count())
        return state

    def open_group(self, task: Task, cohort: Sequence[int], start: float) -> None:
        heap, seq = self._arrival_heap()
        limit = task.deadline_s
        for reply in self.dispatch(task, cohort):  # type: ignore[attr-defined]
            if limit is not None and reply.elapsed_s > limit:
                # The group closes at its deadline, as a network server's does: whoever has not
                # replied by then is dropped at that moment (a late update is refused there too).
                msg = reply.message
                reply = Reply(Dropout(msg.client_id, task.round, missed_deadline(limit), downlink_bytes=msg.downlink_bytes), limit)
            heapq.heappush(heap, (start + reply.elapsed_s, next(seq), task.round, reply))

    def next_arrival(self, timeout_s: float | None = None) -> Arrival | None:
        heap, _ = self._arrival_heap()
        if not heap:
            return None
        at, _, group, reply = heapq.heappop(heap)
        return Arrival(group, reply, at)

    def arrival_due(self, now: float) -> bool:
        heap, _ = self._arrival_heap()
        return bool(heap) and heap[0][0] <= now

    def awaiting_replies(self) -> bool:
        return bool(self._arrival_heap()[0])

    def close_groups(self, reason: str) -> None:
        self.__dict__.pop("_arrivals", None)

    def wait_available(self, min_clients: int, timeout_s: float) -> list[int]:
        """Block until `min_clients` are available or `timeout_s` passes; returns them."""
        return list(self.available(0))  # type: ignore[attr-defined]

    def close(self) -> None:
        """Release what the transport holds (Ray workers, sockets); the simulation holds nothing."""
