"""Who trains this round."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class RandomSelector:
    """Uniform sampling without replacement (McMahan et al., AISTATS 2017, FedAvg's C-fraction)."""

    name = "random"

    def select(self, available: Sequence[int], k: int, round: int, rng: np.random.Generator) -> list[int]:
        n = len(available)
        if k > n:
            raise ValueError(f"cannot select {k} clients: only {n} available in round {round}")
        if isinstance(available, range) and available.start == 0 and available.step == 1:
            picked = rng.choice(n, size=k, replace=False)
        else:
            picked = np.asarray(available)[rng.choice(n, size=k, replace=False)]
        return sorted(int(c) for c in picked)
