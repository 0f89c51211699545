"""Evaluation of the global model: centrally on the held-out test set, and
federated on the clients' local test splits (so global and local views of
accuracy are both visible).  Both are one batched forward pass."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data import FederatedData
from ..learners.base import Learner


class Evaluator:
    def __init__(self, learner: Learner, data: FederatedData, eval_clients: int, seed: int, federated: bool = True):
        self.learner = learner
        self.data = data
        self.enabled_federated = federated
        n = data.num_clients
        sizes = data.test_sizes()
        candidates = np.flatnonzero(sizes > 0)
        if eval_clients and len(candidates) > eval_clients:
            rng = np.random.default_rng([seed, 0xE7A1])
            candidates = np.sort(rng.choice(candidates, size=eval_clients, replace=False))
        self.clients = candidates
        # One index array over the sampled clients' test rows, and the owner of each row.
        parts = [data.test_indices(int(c)) for c in candidates]
        self.rows = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)
        self.owner = np.repeat(np.arange(len(candidates)), sizes[candidates]) if n else np.zeros(0, dtype=np.int64)
        self.counts = sizes[candidates].astype(np.float64)

    def central(self, params: torch.Tensor) -> tuple[float, float]:
        """(loss, accuracy) on the held-out central test set."""
        if self.data.central_y.numel() == 0:
            return math.nan, math.nan
        loss, correct = self.learner.per_example(params, self.data.central_x, self.data.central_y)
        return float(loss.mean()), float(correct.mean())

    def federated(self, params: torch.Tensor) -> tuple[float, float]:
        """(mean, 10th percentile) over clients of the global model's local test accuracy."""
        if self.rows.numel() == 0 or not self.enabled_federated:
            return math.nan, math.nan
        x, y = self.data.x[self.rows], self.data.y[self.rows]
        at_own_width = getattr(self.learner, "per_example_of_clients", None)
        if at_own_width is not None:  # HeteroFL: each client evaluates the sub-model it would run
            _, correct = at_own_width(params, x, y, self.clients[self.owner])
        else:
            _, correct = self.learner.per_example(params, x, y)
        per_client = np.bincount(self.owner, weights=correct.numpy(), minlength=len(self.clients)) / self.counts
        return float(per_client.mean()), float(np.percentile(per_client, 10))
