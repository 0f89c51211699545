"""Aggregators on (n, d) matrices and server optimizers.

Public functions for users who build their own parts: `mean(updates, weights=None)`,
`median`, `trimmed_mean`, `krum`, `bulyan`, `geometric_median`, `norm_bounded_mean`,
`centered_clipping` (robust.py).
"""

from .mean import MeanAggregator, StreamingMean, mean
from .robust import (
    ROBUST_AGGREGATORS,
    BulyanAggregator,
    CenteredClippingAggregator,
    GeometricMedianAggregator,
    KrumAggregator,
    MedianAggregator,
    MultiKrumAggregator,
    NormBoundedMeanAggregator,
    TrimmedMeanAggregator,
    bulyan,
    centered_clipping,
    default_f,
    geometric_median,
    krum,
    median,
    norm_bounded_mean,
    pairwise_sq_distances,
    trimmed_mean,
)
from .server_opt import ServerSGD

AGGREGATORS = {"mean": MeanAggregator, **ROBUST_AGGREGATORS}
SERVER_OPTIMIZERS = {"sgd": ServerSGD}

__all__ = [
    "AGGREGATORS",
    "SERVER_OPTIMIZERS",
    "BulyanAggregator",
    "CenteredClippingAggregator",
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
    "geometric_median",
    "krum",
    "mean",
    "median",
    "norm_bounded_mean",
    "pairwise_sq_distances",
    "trimmed_mean",
]
