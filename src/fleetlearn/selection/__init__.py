"""Selectors: `select(available, k, round, rng) -> cohort`."""

from .random import RandomSelector

SELECTORS = {"random": RandomSelector}

__all__ = ["SELECTORS", "RandomSelector"]
