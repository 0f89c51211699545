"""Selectors: `select(available, k, round, rng) -> cohort`; optional `observe(record)`."""

from .oort import OortSelector
from .random import RandomSelector

SELECTORS = {"random": RandomSelector, "oort": OortSelector}

__all__ = ["SELECTORS", "OortSelector", "RandomSelector"]
