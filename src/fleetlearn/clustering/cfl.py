"""CFL's split rule and bipartition (Sattler, Mueller & Samek, "Clustered Federated Learning:
Model-Agnostic Distributed Multitask Optimization Under Privacy Constraints", IEEE TNNLS 2020).

Algorithm 1 of the paper: when the federation of a cluster has reached a stationary point of
the joint objective (the norm of the averaged update is small, eq. (27): ||sum_i w_i dtheta_i|| < eps1)
while some clients are still far from their own stationary point (max_i ||dtheta_i|| > eps2,
eq. (28)), the clients' objectives are incongruent and the cluster is bipartitioned by the
cosine similarity of their updates (eq. (24)), alpha_ij = <dtheta_i, dtheta_j> / (||dtheta_i|| ||dtheta_j||).

The bipartition: the paper's "optimal bipartition" (Sec. IV, Algorithm 2) merges the most
similar pairs until two groups remain, which is single-linkage agglomerative clustering;
the authors' reference code uses complete linkage on -alpha.  `bipartition` does
agglomerative clustering on 1 - alpha with the linkage given (complete by default: less
prone than single linkage to cutting off one outlier), via scipy.
"""

from __future__ import annotations

import numpy as np
import torch


def cosine_similarities(updates: torch.Tensor) -> np.ndarray:
    """(m, m) cosine similarities of the rows of `updates` (a zero row is similar to nothing)."""
    u = updates.double()
    norms = torch.linalg.vector_norm(u, dim=1, keepdim=True)
    unit = torch.where(norms > 0, u / norms.clamp(min=1e-300), torch.zeros_like(u))
    return (unit @ unit.T).clamp(-1.0, 1.0).numpy()


def bipartition(similarity: np.ndarray, linkage: str = "complete") -> np.ndarray:
    """A boolean (m,) array splitting the clients in two groups (True: the second group,
    the one not holding client 0)."""
    from scipy.cluster.hierarchy import fcluster, linkage as build
    from scipy.spatial.distance import squareform

    m = similarity.shape[0]
    if m < 2:
        raise ValueError(f"cannot bipartition {m} client(s)")
    dist = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    dist = (dist + dist.T) / 2
    labels = fcluster(build(squareform(dist, checks=False), method=linkage), t=2, criterion="maxclust")
    return labels != labels[0]


def split_criterion(updates: torch.Tensor, weights: np.ndarray) -> tuple[float, float]:
    """(norm of the weighted mean update, largest update norm) of one cluster's updates."""
    w = torch.from_numpy(np.asarray(weights, dtype=np.float64) / np.sum(weights))
    mean = (w[:, None] * updates.double()).sum(0)
    return float(torch.linalg.vector_norm(mean)), float(torch.linalg.vector_norm(updates.double(), dim=1).max())


def separation_gap(similarity: np.ndarray, side: np.ndarray) -> tuple[float, float]:
    """(mean similarity within the halves, mean similarity across them) of a bipartition.

    Sattler et al. 2020 (Sec. IV) call a bipartition correct when the cross-half
    similarities lie below the within-half ones (the separation gap).  With more than two
    true groups the first split puts several groups in one half, so its *smallest*
    within-half similarity is that of two different groups and the min/max gap is negative
    even for a correct split; the gap of the means stays positive (measured on the planted
    problems: correct splits 0.45-1.26, splits of congruent clusters 0.14-0.22)."""
    same = side[:, None] == side[None, :]
    off = ~np.eye(len(side), dtype=bool)
    intra = similarity[same & off]
    cross = similarity[~same]
    return (float(intra.mean()) if intra.size else 1.0), float(cross.mean())
