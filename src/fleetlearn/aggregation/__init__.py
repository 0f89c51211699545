"""Aggregators on (n, d) matrices and server optimizers.

Public functions for users who build their own parts: `mean(updates, weights=None)`.
"""

from .mean import MeanAggregator, StreamingMean, mean
from .server_opt import ServerSGD

AGGREGATORS = {"mean": MeanAggregator}
SERVER_OPTIMIZERS = {"sgd": ServerSGD}

__all__ = ["AGGREGATORS", "SERVER_OPTIMIZERS", "MeanAggregator", "ServerSGD", "StreamingMean", "mean"]
