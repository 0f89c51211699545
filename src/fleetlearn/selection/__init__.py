"""Selectors: `select(available, k, round, rng) -> cohort`, `inclusion(available, k)` (how it
samples, for the privacy accountant; None when not uniform); optional `observe(record)`."""

from pydantic import Field

from ..parts import PartConfig, register_part, table
from .base import Selector
from .oort import OortSelector
from .random import PoissonSelector, RandomSelector
from .wrappers import NewcomerCap, RestrictedSelector



# -- registration (fleetlearn.parts) ---------------------------------------------------------
# ``server.selector = "random"``, or a table with the part's own keys:
# ``server.selector = {name = "oort", epsilon = 0.2, alpha = 2.0}``.  The old flat keys
# ``server.oort_epsilon`` / ``server.oort_alpha`` are still read.  `uniform_sampling`: every
# client of the available set is equally likely (the central-DP accountant's assumption).
class OortConfig(PartConfig):
    epsilon: float = Field(default=0.2, ge=0, le=1)  # fraction of each cohort that explores untried clients
    alpha: float = Field(default=2.0, ge=0)  # strength of the penalty on clients slower than preferred


def _build_oort(ctx, options):
    return OortSelector(ctx.population, epsilon=options.epsilon, alpha=options.alpha, quantile=ctx.config.server.deadline_quantile)


register_part("selector", "random", RandomSelector, capabilities={"uniform_sampling"})
register_part("selector", "poisson", PoissonSelector, capabilities={"uniform_sampling"})
register_part("selector", "oort", OortSelector, config=OortConfig, build=_build_oort,
              legacy={"oort_epsilon": "epsilon", "oort_alpha": "alpha"}, capabilities={"learns_from_rounds"})
SELECTORS = table("selector")  # name -> class: a live view of the registry

__all__ = ["SELECTORS", "NewcomerCap", "OortSelector", "PoissonSelector", "RandomSelector", "RestrictedSelector", "Selector"]
