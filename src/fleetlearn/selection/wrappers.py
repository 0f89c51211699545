"""Selector wrappers: restrict or pace who can be selected, around any selector."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .base import Selector


class RestrictedSelector(Selector):
    """Select only among `allowed` clients (a canary arm's share of the population).
    Asks the inner selector for at most as many clients as remain available."""

    name = "restricted"

    def __init__(self, inner: Any, allowed: Sequence[int]):
        self.inner = inner
        self.allowed = np.unique(np.asarray(allowed, dtype=np.int64))

    def select(self, available: Sequence[int], k: int, round: int, rng: np.random.Generator) -> list[int]:
        pool = np.intersect1d(np.asarray(available, dtype=np.int64), self.allowed, assume_unique=False)
        return self.inner.select(pool, min(k, len(pool)), round, rng)

    def inclusion(self, available: Sequence[int], k: int):
        """The inner selector's sampling over this arm's share of the available clients."""
        pool = np.intersect1d(np.asarray(available, dtype=np.int64), self.allowed, assume_unique=False)
        return self.inner.inclusion(pool, min(k, len(pool)))

    def observe(self, record) -> None:
        self.inner.observe(record)

    def restore(self, records) -> None:
        self.inner.restore(records)


class NewcomerCap(Selector):
    """Gradual onboarding: at most `max_newcomers` clients never selected before take
    part in a round (a seeded sample of the available newcomers competes with every
    client seen before).  The round's count is recorded in ``extra["newcomers"]``."""

    name = "newcomer_cap"

    def __init__(self, inner: Any, max_newcomers: int, population: int):
        if max_newcomers < 1:
            raise ValueError(f"max_newcomers must be >= 1, got {max_newcomers}")
        self.inner = inner
        self.max_newcomers = int(max_newcomers)
        self.seen = np.zeros(population, dtype=bool)  # one bit per client, like Oort's `tried`
        self._last_newcomers = 0

    def select(self, available: Sequence[int], k: int, round: int, rng: np.random.Generator) -> list[int]:
        ids = np.asarray(available, dtype=np.int64)
        new = ids[~self.seen[ids]]
        if len(new) > self.max_newcomers:
            new = rng.choice(new, size=self.max_newcomers, replace=False)
        pool = np.union1d(ids[self.seen[ids]], new)
        cohort = self.inner.select(pool, min(k, len(pool)), round, rng)
        picked = np.asarray(cohort, dtype=np.int64)
        self._last_newcomers = int((~self.seen[picked]).sum()) if picked.size else 0
        self.seen[picked] = True
        return cohort

    def inclusion(self, available: Sequence[int], k: int) -> None:
        """Not uniform: a newcomer's chance depends on how many newcomers are available."""
        return None

    def observe(self, record) -> None:
        record.extra["newcomers"] = self._last_newcomers
        self.inner.observe(record)

    def restore(self, records) -> None:
        """A resumed run: every client a committed round selected has been seen."""
        for record in records:
            ids = np.fromiter((c.client_id for c in record.clients), dtype=np.int64)
            self.seen[ids] = True
        self.inner.restore(records)
