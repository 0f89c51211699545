"""Who trains this round: the uniform selectors.

Each selector says how it samples (`inclusion`), because the privacy accountant
needs it: ``("fixed", k / n)`` for a fixed-size cohort drawn uniformly without
replacement from the n available clients, ``("poisson", q)`` for Poisson sampling
where every available client takes part independently with probability q, or
None for a selector whose choice is not uniform (it depends on reported losses,
history, ...), which central DP cannot account for.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Selector

Inclusion = tuple[str, float]  # ("fixed" | "poisson", per-client inclusion probability)


class RandomSelector(Selector):
    """A fixed-size cohort, uniform without replacement (McMahan et al., AISTATS 2017,
    FedAvg's C-fraction)."""

    name = "random"
    sampling = "fixed"

    def select(self, available: Sequence[int], k: int, round: int, rng: np.random.Generator) -> list[int]:
        n = len(available)
        if k > n:
            raise ValueError(f"cannot select {k} clients: only {n} available in round {round}")
        if isinstance(available, range) and available.start == 0 and available.step == 1:
            picked = rng.choice(n, size=k, replace=False)
        else:
            picked = np.asarray(available)[rng.choice(n, size=k, replace=False)]
        return sorted(int(c) for c in picked)

    def inclusion(self, available: Sequence[int], k: int) -> Inclusion | None:
        """Every available client is in the cohort with probability k / n."""
        n = len(available)
        return (self.sampling, min(k, n) / n) if n else None


class PoissonSelector(Selector):
    """Poisson sampling: each of the n available clients takes part independently with
    probability q = k / n, so the cohort's size varies around k (its expected size).
    This is the sampling DP-FedAvg's accountant assumes (McMahan et al., ICLR 2018:
    ``PoissonSampledDpEvent``), and the default selector under central DP."""

    name = "poisson"
    sampling = "poisson"

    def select(self, available: Sequence[int], k: int, round: int, rng: np.random.Generator) -> list[int]:
        ids = np.asarray(available, dtype=np.int64)
        n = ids.size
        if k > n:
            raise ValueError(f"cannot select {k} clients on average: only {n} available in round {round}")
        if n == 0:
            return []
        picked = ids[rng.random(n) < k / n]
        return sorted(int(c) for c in picked)

    def inclusion(self, available: Sequence[int], k: int) -> Inclusion | None:
        n = len(available)
        return (self.sampling, min(k, n) / n) if n else None

    def target(self, drawn: int, cohort: int, over_selection: float) -> int:
        """Every client of the draw counts (its size is the random one DP-FedAvg's unbiased
        estimate divides by the expected cohort); with over-selection, the draw's share."""
        return max(1, round(drawn / over_selection)) if drawn else 0
