"""Aggregators on (n, d) matrices and server optimizers.

Public functions for users who build their own parts: `mean(updates, weights=None)`,
`median`, `trimmed_mean`, `krum`, `bulyan`, `geometric_median`, `norm_bounded_mean`,
`centered_clipping`, `dnc` (robust.py); `ClientReputation` (reputation.py).
"""

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

AGGREGATORS = {"mean": MeanAggregator, **ROBUST_AGGREGATORS}
# Built by the factory from the run's population and model size, not from `[server]` keys alone.
SPECIAL_AGGREGATORS = ("mifa",)


def aggregator_names() -> list[str]:
    """Every name `server.aggregator` accepts: the registered rules and the special ones."""
    return sorted([*AGGREGATORS, *SPECIAL_AGGREGATORS])


def register_aggregator(cls):
    """Register an aggregation rule under ``cls.name`` so ``server.aggregator = "<name>"`` runs
    it (usable as a class decorator).  The class needs ``name``, ``needs_individual_updates``
    (False only for a weighted mean that secure aggregation could sum), optionally
    ``config_keys`` (``[server]`` key -> constructor keyword), and
    ``aggregate(updates (n, d), weights (n,)) -> (d,)``; ``needs_client_ids = True`` makes the
    engine call ``aggregate_round(ids, updates, weights)`` instead.  To run under central DP it
    also needs ``contributions`` (see aggregation.pipeline)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an aggregator needs a `name` that is an identifier, got {name!r}")
    if name in SPECIAL_AGGREGATORS or (name in AGGREGATORS and AGGREGATORS[name] is not cls):
        raise ValueError(f"aggregator name {name!r} is taken by {AGGREGATORS.get(name, name)!r}")
    if not callable(getattr(cls, "aggregate", None)):
        raise ValueError(f"aggregator {name!r} has no aggregate(updates, weights) method")
    AGGREGATORS[name] = cls
    return cls
SERVER_OPTIMIZERS = {
    "sgd": ServerSGD,
    "momentum": ServerMomentum,
    "adam": ServerAdam,
    "yogi": ServerYogi,
    "adagrad": ServerAdagrad,
}

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
