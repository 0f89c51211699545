"""Client reputation: remember which clients a robust rule keeps flagging.

A per-round outlier filter (DnC, Krum, ...) under heavy label skew catches most but
not all attackers: an honest client with unusual data sometimes looks like an
outlier, and an attacker sometimes does not.  The malicious clients of a real
attack, however, are the same clients round after round, so the evidence adds up
across the rounds a client is selected in.  This is the idea of history-based
detection (FLDetector, Zhang et al., KDD 2022; the reputation scores of FoolsGold,
Fung et al., RAID 2020): keep, per client, how many of its updates were seen and how
many were flagged, and stop trusting a client flagged in more than ``threshold`` of at
least ``min_rounds`` appearances.

The record is two counters per client id ever seen (O(population) integers, never
vectors); `state_dict` / `load_state_dict` round-trip it as tensors.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Sequence

import numpy as np
import torch

__all__ = ["ClientReputation"]


class ClientReputation:
    """Per-client counts of updates seen and updates flagged as outliers.

    `distrusted(ids)` says which clients have been flagged in more than ``threshold``
    of their appearances, once they have at least ``min_rounds`` of them; `record(ids,
    flagged)` adds one round's evidence.  A client is judged only on its own history,
    so a distrusted client that stops being flagged earns trust back as its ratio
    falls to ``threshold`` or below."""

    def __init__(self, min_rounds: int = 2, threshold: float = 0.5):
        if isinstance(min_rounds, bool) or not isinstance(min_rounds, Integral) or min_rounds < 1:
            raise ValueError(f"reputation: min_rounds must be an integer >= 1, got {min_rounds!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not (0.0 <= threshold < 1.0) or math.isnan(threshold):
            raise ValueError(f"reputation: threshold is a flagged fraction and must satisfy 0 <= threshold < 1, got {threshold!r}")
        self.min_rounds = int(min_rounds)
        self.threshold = float(threshold)
        self._seen: dict[int, int] = {}
        self._flagged: dict[int, int] = {}

    @staticmethod
    def _ids(ids: Sequence[int]) -> list[int]:
        out = np.asarray(ids)
        if out.ndim != 1 or (out.size and out.dtype.kind not in "iu"):
            raise ValueError(f"reputation: client ids must be a 1-d sequence of integers, got {out.dtype} shape {out.shape}")
        return [int(i) for i in out.tolist()]

    def distrusted(self, ids: Sequence[int]) -> torch.Tensor:
        """Boolean mask over `ids`: enough appearances and flagged too often."""
        out = []
        for i in self._ids(ids):
            seen = self._seen.get(i, 0)
            out.append(seen >= self.min_rounds and self._flagged.get(i, 0) > self.threshold * seen)
        return torch.tensor(out, dtype=torch.bool)

    def record(self, ids: Sequence[int], flagged) -> None:
        """Add one round: every client in `ids` was seen once, those with `flagged` true flagged once."""
        ids = self._ids(ids)
        flags = torch.as_tensor(flagged, dtype=torch.bool).flatten().tolist()
        if len(flags) != len(ids):
            raise ValueError(f"reputation: {len(ids)} client ids but {len(flags)} flags")
        if len(set(ids)) != len(ids):
            raise ValueError("reputation: a client appears twice in one round")
        for i, fl in zip(ids, flags):
            self._seen[i] = self._seen.get(i, 0) + 1
            if fl:
                self._flagged[i] = self._flagged.get(i, 0) + 1

    def counts(self, client: int) -> tuple[int, int]:
        """(seen, flagged) for one client."""
        return self._seen.get(int(client), 0), self._flagged.get(int(client), 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        ids = sorted(self._seen)
        return {
            "ids": torch.tensor(ids, dtype=torch.int64),
            "seen": torch.tensor([self._seen[i] for i in ids], dtype=torch.int64),
            "flagged": torch.tensor([self._flagged.get(i, 0) for i in ids], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"ids", "seen", "flagged"} - set(state)
        if missing:
            raise ValueError(f"reputation: state lacks {sorted(missing)}")
        ids, seen, flagged = (torch.as_tensor(state[k]).flatten().tolist() for k in ("ids", "seen", "flagged"))
        if not (len(ids) == len(seen) == len(flagged)):
            raise ValueError(f"reputation: state arrays differ in length ({len(ids)}, {len(seen)}, {len(flagged)})")
        if any(s < 0 or g < 0 or g > s for s, g in zip(seen, flagged)):
            raise ValueError("reputation: state needs 0 <= flagged <= seen for every client")
        self._seen = {int(i): int(s) for i, s in zip(ids, seen)}
        self._flagged = {int(i): int(g) for i, g in zip(ids, flagged) if g}
