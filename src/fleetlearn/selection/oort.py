"""Availability- and speed-aware selection after Oort (Lai et al., OSDI 2021, Alg. 1).

Each client's utility is its statistical utility times a system-speed penalty:

    U_i = |B_i| * sqrt(mean loss_i^2)   *   (T / t_i)^alpha  if t_i > T, else 1

where |B_i| is its example count, loss_i its last reported training loss, t_i its
last completion time and T the preferred round duration (the `deadline_quantile`
of recent completion times).  A staleness bonus sqrt(0.1 ln R / L_i) (L_i: round
it was last seen) keeps rarely tried clients in play.  A fraction epsilon of each
cohort explores clients never tried, favouring the fastest-looking ones; the rest
is drawn from the top-utility clients with probability proportional to utility,
among those currently available (availability-aware by construction: the
transport lists only online clients).

State is one float array per attribute over the population (memory O(population)
floats, never O(population x model)); it is updated from each RoundRecord by
`observe`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..records import RoundRecord
from .base import Selector


class OortSelector(Selector):
    name = "oort"

    def __init__(self, population: int, epsilon: float = 0.2, alpha: float = 2.0, quantile: float = 0.8, cutoff: float = 0.95):
        self.epsilon = epsilon
        self.alpha = alpha
        self.quantile = quantile
        self.cutoff = cutoff  # sample from clients whose utility is within the top (1 - cutoff) mass
        self.utility = np.zeros(population)
        self.duration = np.full(population, np.nan)
        self.last_seen = np.zeros(population)
        self.tried = np.zeros(population, dtype=bool)
        self.failures = np.zeros(population)
        self.round = 0

    def observe(self, record: RoundRecord) -> None:
        """Learn from a finished round: losses, sizes and completion times of who replied."""
        self.round = record.round
        for c in record.clients:
            cid = c.client_id
            self.tried[cid] = True
            self.last_seen[cid] = record.round
            if c.status == "accepted" or c.status == "late":
                if not math.isnan(c.arrival_s):
                    self.duration[cid] = c.arrival_s
                loss = c.loss_before if not math.isnan(c.loss_before) else 0.0
                self.utility[cid] = max(c.num_examples, 1) * math.sqrt(max(loss, 0.0) ** 2)
                if c.status == "late":
                    self.failures[cid] += 1
            elif c.status == "dropped":
                self.failures[cid] += 1

    def restore(self, records) -> None:
        """Relearn from a resumed run's committed rounds (the state is what `observe` built)."""
        for record in records:
            self.observe(record)

    def scores(self, ids: np.ndarray) -> np.ndarray:
        known = ~np.isnan(self.duration[ids])
        t_pref = np.nanquantile(self.duration[self.tried & ~np.isnan(self.duration)], self.quantile) if known.any() else 1.0
        penalty = np.ones(len(ids))
        slow = known & (self.duration[ids] > t_pref)
        penalty[slow] = (t_pref / self.duration[ids][slow]) ** self.alpha
        bonus = np.sqrt(0.1 * math.log(max(self.round, 1) + 1) / np.maximum(self.last_seen[ids], 1))
        reliability = 1.0 / (1.0 + self.failures[ids])
        return (self.utility[ids] + bonus) * penalty * reliability

    def inclusion(self, available: Sequence[int], k: int) -> None:
        """Not uniform: a client's chance depends on its reported losses and speed, so a
        sampling-based privacy accountant has nothing sound to compose (refused under DP)."""
        return None

    def select(self, available: Sequence[int], k: int, round: int, rng: np.random.Generator) -> list[int]:
        ids = np.asarray(available, dtype=np.int64)
        if k > len(ids):
            raise ValueError(f"cannot select {k} clients: only {len(ids)} available in round {round}")
        fresh = ids[~self.tried[ids]]
        seen = ids[self.tried[ids]]
        n_explore = min(len(fresh), max(int(round_half(self.epsilon * k)), k - len(seen)))
        explore = rng.choice(fresh, size=n_explore, replace=False) if n_explore else np.zeros(0, dtype=np.int64)
        n_exploit = k - n_explore
        exploit = np.zeros(0, dtype=np.int64)
        if n_exploit:
            s = self.scores(seen)
            order = np.argsort(-s, kind="stable")
            # Keep the clients carrying the top `cutoff` of utility (at least n_exploit of them),
            # then sample among them proportionally to utility.
            csum = np.cumsum(s[order]) / max(s.sum(), 1e-12)
            top = max(n_exploit, int(np.searchsorted(csum, self.cutoff)) + 1)
            pool = order[:top]
            p = s[pool] / s[pool].sum() if s[pool].sum() > 0 else None
            exploit = seen[rng.choice(pool, size=n_exploit, replace=False, p=p)]
        return sorted(int(c) for c in np.concatenate([explore, exploit]))


def round_half(x: float) -> float:
    return math.floor(x + 0.5)
