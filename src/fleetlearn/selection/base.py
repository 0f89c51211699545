"""The selector contract, with the defaults of a selector that learns nothing."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class Selector:
    """``select(available, k, round, rng) -> cohort``; `inclusion` says how it samples (for
    the privacy accountant: ``("fixed" | "poisson", q)``, or None when the choice is not
    uniform); `observe(record)` after each round and `restore(records)` on resume let a
    selector learn from rounds (Oort, the newcomer cap)."""

    name = "selector"

    def select(self, available: Sequence[int], k: int, round: int, rng: np.random.Generator) -> list[int]:  # pragma: no cover
        raise NotImplementedError

    def inclusion(self, available: Sequence[int], k: int) -> tuple[str, float] | None:
        return None

    def target(self, drawn: int, cohort: int, over_selection: float) -> int:
        """How many accepted updates end a round that selected `drawn` clients: the
        configured cohort (the rest of an over-selected draw is not waited for)."""
        return cohort

    def observe(self, record: Any) -> None:
        """After each round, with its record."""

    def restore(self, records: Sequence[Any]) -> None:
        """On resume, with the committed records."""
