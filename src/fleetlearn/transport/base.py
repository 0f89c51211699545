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
