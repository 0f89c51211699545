"""Aggregators on (n, d) matrices and server optimizers.

Public functions for users who build their own parts: `mean(updates, weights=None)`,
`median`, `trimmed_mean`, `krum`, `bulyan`, `geometric_median`, `norm_bounded_mean`,
`centered_clipping`, `dnc` (robust.py); `ClientReputation` (reputation.py).
"""

from pydantic import Field

from ..parts import PartConfig, find_part, names, register_part, table
from .mean import MeanAggregator, StreamingMean, mean
from .robust import (
    ROBUST_AGGREGATORS,
    BulyanAggregator,
    CenteredClippingAggregator,
    DnCAggregator,
    GeometricMedianAggregator,
    KrumAggregator,
    MedianAggregator,
    MultiKrumAggregator,
    NormBoundedMeanAggregator,
    TrimmedMeanAggregator,
    bulyan,
    centered_clipping,
    default_f,
    dnc,
    dnc_scores,
    geometric_median,
    krum,
    median,
    norm_bounded_mean,
    pairwise_sq_distances,
    trimmed_mean,
)
from .reputation import ClientReputation
from .schedules import SCHEDULES, schedule_from_config
from .server_opt import ServerAdagrad, ServerAdam, ServerMomentum, ServerSGD, ServerYogi
from .weighting import WEIGHTINGS, CohortInfo, make_weighting, weighting_from_config

# -- registration (fleetlearn.parts) ---------------------------------------------------------
# Aggregators: `AGGREGATORS` is a live view of the registry's "aggregator" kind (name -> class).
# A rule's capabilities come from its flags: `linear` (needs_individual_updates = False: a
# weighted sum that secure aggregation or a sketch can compute), `needs_individual_updates`,
# `needs_client_ids`; `bounded_sensitivity` where it bounds each client's contribution.
register_part("aggregator", "mean", MeanAggregator, capabilities={"bounded_sensitivity"})
for _name, _cls in ROBUST_AGGREGATORS.items():
    register_part("aggregator", _name, _cls,
                  capabilities=({"bounded_sensitivity"} if _name in ("norm_bounded_mean", "centered_clipping") else set())
                  | ({"flags_clients"} if _name == "dnc" else set()))


def _build_mifa(ctx, options):
    from .mifa import MIFA

    return MIFA(ctx.dim, max_clients=ctx.config.server.mifa_max_clients or ctx.population)


def _mifa_class():
    from .mifa import MIFA

    return MIFA


# Built by the factory from the run's population and model size, not from `[server]` keys alone
# (not in the `AGGREGATORS` view, whose classes build from `[server]` keys).
register_part("aggregator", "mifa", _mifa_class, build=_build_mifa, listed=False,
              capabilities={"needs_individual_updates", "needs_client_ids", "sync_only"})
AGGREGATORS = table("aggregator")
SPECIAL_AGGREGATORS = ("mifa",)


def aggregator_names() -> list[str]:
    """Every name `server.aggregator` accepts: the registered rules and the special ones."""
    return sorted(names("aggregator"))


def register_aggregator(cls):
    """Register an aggregation rule under ``cls.name`` so ``server.aggregator = "<name>"`` runs
    it (usable as a class decorator).  The class needs ``name``, ``needs_individual_updates``
    (False only for a weighted mean that secure aggregation could sum), optionally
    ``config_keys`` (``[server]`` key -> constructor keyword), and
    ``aggregate(updates (n, d), weights (n,)) -> (d,)``; ``needs_client_ids = True`` makes the
    engine call ``aggregate_round(ids, updates, weights)`` instead.  To run under central DP it
    also needs ``contributions`` (see aggregation.pipeline).  The same as
    ``fleetlearn.parts.register_part("aggregator", cls.name, cls)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an aggregator needs a `name` that is an identifier, got {name!r}")
    if not callable(getattr(cls, "aggregate", None)):
        raise ValueError(f"aggregator {name!r} has no aggregate(updates, weights) method")
    return register_part("aggregator", name, cls)


# -- server optimizers (Reddi et al., ICLR 2021), with their own keys --------------------------
# ``server.optimizer = {name = "adam", beta1 = 0.9, beta2 = 0.99, tau = 1e-3}``; the old flat keys
# ``server.server_momentum`` / ``server_beta1`` / ``server_beta2`` / ``server_tau`` are still read.
# ``server.server_lr`` stays a `[server]` key: the lr schedule and the guardrail scale it.
class MomentumConfig(PartConfig):
    momentum: float = Field(default=0.9, ge=0, lt=1)


class AdaptiveConfig(PartConfig):
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)


class AdagradConfig(PartConfig):  # FedAdagrad has no beta2
    beta1: float = Field(default=0.9, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)


def _build_optimizer(ctx, options):
    part = find_part("server_optimizer", ctx.name)
    kwargs = options.model_dump() if options is not None else {}
    return part.obj(ctx.config.server.server_lr, **kwargs, schedule=ctx.schedule)


_ADAPTIVE_LEGACY = {"server_beta1": "beta1", "server_beta2": "beta2", "server_tau": "tau"}
register_part("server_optimizer", "sgd", ServerSGD, build=_build_optimizer)
register_part("server_optimizer", "momentum", ServerMomentum, config=MomentumConfig, build=_build_optimizer,
              legacy={"server_momentum": "momentum"})
register_part("server_optimizer", "adam", ServerAdam, config=AdaptiveConfig, build=_build_optimizer, legacy=_ADAPTIVE_LEGACY)
register_part("server_optimizer", "yogi", ServerYogi, config=AdaptiveConfig, build=_build_optimizer, legacy=_ADAPTIVE_LEGACY)
register_part("server_optimizer", "adagrad", ServerAdagrad, config=AdagradConfig, build=_build_optimizer,
              legacy={"server_beta1": "beta1", "server_tau": "tau"})
SERVER_OPTIMIZERS = table("server_optimizer")

__all__ = [
    "AGGREGATORS",
    "SPECIAL_AGGREGATORS",
    "aggregator_names",
    "register_aggregator",
    "SERVER_OPTIMIZERS",
    "SCHEDULES",
    "WEIGHTINGS",
    "CohortInfo",
    "ServerAdagrad",
    "ServerAdam",
    "ServerMomentum",
    "ServerYogi",
    "make_weighting",
    "schedule_from_config",
    "weighting_from_config",
    "BulyanAggregator",
    "CenteredClippingAggregator",
    "ClientReputation",
    "DnCAggregator",
    "GeometricMedianAggregator",
    "KrumAggregator",
    "MeanAggregator",
    "MedianAggregator",
    "MultiKrumAggregator",
    "NormBoundedMeanAggregator",
    "ServerSGD",
    "StreamingMean",
    "TrimmedMeanAggregator",
    "bulyan",
    "centered_clipping",
    "default_f",
    "dnc",
    "dnc_scores",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "norm_bounded_mean",
    "pairwise_sq_distances",
    "trimmed_mean",
]
