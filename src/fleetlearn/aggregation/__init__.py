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
SERVER_OPTIMIZERS = {
    "sgd": ServerSGD,
    "momentum": ServerMomentum,
    "adam": ServerAdam,
    "yogi": ServerYogi,
    "adagrad": ServerAdagrad,
}

__all__ = [
    "AGGREGATORS",
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
