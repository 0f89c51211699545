"""Selectors: `select(available, k, round, rng) -> cohort`, `inclusion(available, k)` (how it
samples, for the privacy accountant; None when not uniform); optional `observe(record)`."""

from .base import Selector
from .oort import OortSelector
from .random import PoissonSelector, RandomSelector
from .wrappers import NewcomerCap, RestrictedSelector

SELECTORS = {"random": RandomSelector, "poisson": PoissonSelector, "oort": OortSelector}

__all__ = ["SELECTORS", "NewcomerCap", "OortSelector", "PoissonSelector", "RandomSelector", "RestrictedSelector", "Selector"]
