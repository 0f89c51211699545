"""Weighted mean of client updates, the FedAvg aggregate (McMahan et al., AISTATS 2017, Alg. 1).

Works on an ``(n, d)`` matrix (numpy or torch) and returns ``(d,)``; also available
as a streaming fold, so updates can be added as they arrive without holding the
whole matrix.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(updates) -> torch.Tensor:
    t = torch.as_tensor(updates)
    if t.ndim != 2:
        raise ValueError(f"updates must be an (n, d) matrix, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError("cannot aggregate an empty cohort (n = 0)")
    return t.to(torch.float32) if not t.is_floating_point() else t


def mean(updates, weights=None):
    """Weighted mean of the rows of `updates`; weights default to uniform and are normalised."""
    was_numpy = isinstance(updates, np.ndarray)
    u = _as_tensor(updates)
    if weights is None:
        out = u.mean(0)
    else:
        w = torch.as_tensor(weights, dtype=u.dtype, device=u.device)
        if w.shape != (u.shape[0],):
            raise ValueError(f"weights must have shape ({u.shape[0]},), got {tuple(w.shape)}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and non-negative")
        total = w.sum()
        if total <= 0:
            raise ValueError("weights sum to zero")
        out = (w / total) @ u
    return out.numpy() if was_numpy else out


class StreamingMean:
    """Folds weighted vectors in as they arrive; memory O(d), not O(n d)."""

    def __init__(self, dim: int):
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.weight = 0.0
        self.count = 0

    def add(self, vec: torch.Tensor, weight: float) -> None:
        self.sum.add_(vec.to(torch.float64), alpha=float(weight))
        self.weight += float(weight)
        self.count += 1

    def result(self) -> torch.Tensor:
        if self.count == 0 or self.weight <= 0:
            raise ValueError("no weighted update was added")
        return (self.sum / self.weight).to(torch.float32)


class MeanAggregator:
    """The `mean` aggregator part: ``aggregate(matrix (n, d), weights (n,)) -> (d,)``."""

    name = "mean"
    needs_individual_updates = False

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return mean(updates, weights)
