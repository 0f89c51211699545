"""Clustered FL: IFCA (Ghosh et al., NeurIPS 2020) and CFL (Sattler et al., IEEE TNNLS 2020).

The client side is `fleetlearn.learners.clustered.ClusteredLearner`; the tagged uplink is
`fleetlearn.compression.blocks`; the server parts are in `parts`.
"""

from .cfl import bipartition, cosine_similarities, split_criterion
from .metrics import adjusted_rand_index
from .parts import ACTIVE, MASK, MODES, ClusteredAggregator, ClusteredServerOptimizer, Clustering, ClusteringHook

__all__ = [
    "ACTIVE",
    "MASK",
    "MODES",
    "ClusteredAggregator",
    "ClusteredServerOptimizer",
    "Clustering",
    "ClusteringHook",
    "adjusted_rand_index",
    "bipartition",
    "cosine_similarities",
    "split_criterion",
]
