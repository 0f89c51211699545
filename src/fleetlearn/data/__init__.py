"""Datasets that load without internet, and partitioners that share them among clients.

    data = load_federated(cfg.data, seed)
    x, y = data.x[data.train_indices(c)], data.y[data.train_indices(c)]
"""

from fleetlearn.data.datasets import Dataset, load_dataset
from fleetlearn.data.errors import DataError
from fleetlearn.data.federated import FederatedData, load_federated
from fleetlearn.data.heterogeneity import heterogeneity_stats, label_skew_per_client
from fleetlearn.data.partition import PARTITIONERS, feature_shift, natural

__all__ = [
    "PARTITIONERS",
    "DataError",
    "Dataset",
    "FederatedData",
    "feature_shift",
    "heterogeneity_stats",
    "label_skew_per_client",
    "load_dataset",
    "load_federated",
    "natural",
]
