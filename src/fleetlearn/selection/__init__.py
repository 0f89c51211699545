"""Selectors: `select(available, k, round, rng) -> cohort`; optional `observe(record)`."""

from .oort import OortSelector
from .random import RandomSelector
from .wrappers import NewcomerCap, RestrictedSelector

SELECTORS = {"random": RandomSelector, "oort": OortSelector}

__all__ = ["SELECTORS", "NewcomerCap", "OortSelector", "RandomSelector", "RestrictedSelector"]
